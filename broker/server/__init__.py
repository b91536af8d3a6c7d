"""The network side: the listener and the per-connection protocol.

- ``broker``: :class:`Broker`, which owns the listener, the storage, the
  disk thread, the client registry and the statistics
- ``connection``: :class:`Connection`, one ``asyncio.Protocol`` per client,
  which parses frames (through ``broker.codec``) and handles each command
- ``delivery``: :class:`Subscription`, push delivery of one topic to one
  connection, with flow control and offset tracking
"""

from .broker import Broker

__all__ = ["Broker"]
