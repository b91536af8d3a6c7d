"""pylogstreams: a persistent publish/subscribe log broker.

Topics are append-only segmented logs; consumers resume from stored
offsets. Run one with ``pylogstreams serve``; embed one with
:class:`broker.server.Broker`. The codec in use (Cython or pure Python) is
``broker.codec.IMPLEMENTATION``.
"""

__version__ = "0.1.0"
__all__ = ["__version__"]
