"""Pure-Python reference implementations of the hot paths.

Each module here has a Cython twin of the same name in ``broker._speedups``
with the same API and byte-identical results. ``broker.codec`` picks one.
"""
