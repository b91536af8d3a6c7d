"""pylogstreams: a persistent publish/subscribe log broker.

Topics are append-only segmented logs; consumers resume from stored
offsets. Run one with ``pylogstreams serve``; embed one with
:class:`broker.server.Broker`. The codec in use (Cython or pure Python) is
``broker.codec.IMPLEMENTATION``.
"""

__version__ = "0.1.0"
__all__ = ["__version__", "Client", "AsyncClient", "Message"]


def __getattr__(name):
    # Lazy, so that `import broker` doesn't load the codec before
    # `pylogstreams serve --pure` has had a chance to choose it.
    if name in ("Client", "AsyncClient", "Message"):
        from . import client
        return getattr(client, name)
    raise AttributeError("module 'broker' has no attribute %r" % name)
