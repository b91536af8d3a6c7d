"""Client library for protocol v1: blocking and asyncio.

- :class:`Client`: blocking, for scripts and threads
- :class:`AsyncClient`: asyncio
- :class:`Message`: what subscriptions yield
- :func:`tune_malloc`: opt-in glibc settings for a process that consumes
  at a high rate (see :mod:`broker.client.memory`)
- exceptions in :mod:`broker.client.errors`, one per broker error code
"""

from .aio import AsyncClient, Producer as AsyncProducer, Subscription as AsyncSubscription
from .errors import *  # noqa: F401,F403
from .errors import __all__ as _errors_all
from .memory import tune_malloc
from .message import Message
from .sync import Client, Producer, Subscription

__all__ = ["Client", "AsyncClient", "Message", "Producer", "Subscription",
           "AsyncProducer", "AsyncSubscription", "tune_malloc", *_errors_all]
