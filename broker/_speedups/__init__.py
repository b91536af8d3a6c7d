"""Cython implementations of the hot paths (frame scanning, CRC-32, records).

Each extension here mirrors the pure module of the same name in
``broker._pure``; ``broker.codec`` decides which pair is loaded.
"""
