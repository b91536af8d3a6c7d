"""Broker settings, with their defaults in one place.

The CLI fills a :class:`Config` from its options (each also readable from a
``PYLOGSTREAMS_*`` environment variable); embedding code builds one directly.
"""

from __future__ import annotations

import dataclasses

__all__ = ["Config", "FSYNC_POLICIES"]

FSYNC_POLICIES = ("always", "interval", "never")


@dataclasses.dataclass
class Config:
    """Everything the broker can be told. Defaults match the prototype's."""

    host: str = "127.0.0.1"               # loopback by default: opt in to exposure
    port: int = 1234                      # the prototype's port; 0 picks a free one
    data_dir: str = "./data"              # logs, indexes and consumer offsets
    heartbeat_timeout: float = 120.0      # seconds of silence before a client is closed
    segment_bytes: int = 64 * 1024 * 1024  # a segment rolls once it reaches this size
    index_interval_bytes: int = 4096      # one sparse index entry per this many log bytes
    max_frame_bytes: int = 1024 * 1024    # largest frame body a client may send
    fsync: str = "interval"               # always | interval | never
    fsync_interval_ms: int = 1000         # with fsync="interval": the most data may wait
    # Flow control. Producers are paused while more than this many published
    # bytes wait for the disk thread, and resumed below the low mark.
    append_high_water: int = 16 * 1024 * 1024
    append_low_water: int = 4 * 1024 * 1024
    # A consumer's transport stops receiving deliveries above this many
    # buffered bytes, until it drains below the low mark.
    write_high_water: int = 1024 * 1024
    write_low_water: int = 256 * 1024
    delivery_chunk_bytes: int = 256 * 1024  # bytes read from the log per delivery step
    # A write job up to this size, when the disk thread is idle, is written
    # on the event loop (one pwrite into the page cache) instead of being
    # handed over (two thread wake-ups); 0: always the disk thread.
    inline_write_bytes: int = 64 * 1024
    # The newest record batches, kept in memory for consumers that keep up
    # (broker/storage/tailcache.py); broker-wide, 0 turns it off.
    tail_cache_bytes: int = 32 * 1024 * 1024
    # Storage (docs/storage.md). Retention and fsync settings are per-topic
    # defaults: LogStore.set_topic_config overrides them for one topic.
    retention_ms: int = 7 * 24 * 3600 * 1000  # delete sealed segments older than this; -1: never
    retention_bytes: int = -1             # keep each topic at most this big; -1: no limit
    retention_check_interval_ms: int = 30_000  # how often retention runs
    checkpoint_interval_ms: int = 10_000  # recovery checkpoint at most this often (after fsyncs)
    max_open_segments: int = 256          # segment files open for reading, broker-wide (LRU)
    max_open_writers: int = 128           # active segments open for appending (2 fds each, LRU)

    # Limits (docs/security.md). Each refusal is logged and counted; a v1
    # client gets ERR LIMIT_EXCEEDED.
    max_connections: int = 20_000         # connections at once; more are closed on accept
    max_connections_per_ip: int = 5_000   # connections at once from one address
    max_topics: int = 10_000              # topics; creating one more is refused
    max_subscriptions: int = 1_000        # subscriptions on one connection
    read_timeout: float = 30.0            # seconds a partial frame may wait for its rest
    # Security (docs/security.md).
    tls_cert: str | None = None           # PEM certificate chain: serve TLS when set
    tls_key: str | None = None            # PEM private key for tls_cert
    auth_file: str | None = None          # TOML users file: require AUT (v1) when set
    # Observability.
    metrics_port: int | None = None       # HTTP /metrics and /healthz on host:metrics_port
    metrics_host: str | None = None       # defaults to host

    def __post_init__(self) -> None:
        if self.fsync not in FSYNC_POLICIES:
            raise ValueError("fsync must be one of %s" % ", ".join(FSYNC_POLICIES))
        if not 0 <= self.port <= 65535:
            raise ValueError("port must be in 0..65535")
        if self.heartbeat_timeout <= 0:
            raise ValueError("heartbeat_timeout must be positive")
        if self.segment_bytes < 1024:
            raise ValueError("segment_bytes must be at least 1024")
        if self.max_frame_bytes < 16:
            raise ValueError("max_frame_bytes must be at least 16")
        if self.max_frame_bytes > 0x7FFFFFFF:
            raise ValueError("max_frame_bytes must fit in 31 bits")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("tls_cert and tls_key go together")
        for name in ("max_connections", "max_connections_per_ip", "max_topics",
                     "max_subscriptions"):
            if getattr(self, name) < 1:
                raise ValueError("%s must be at least 1" % name)
        if self.tail_cache_bytes < 0:
            raise ValueError("tail_cache_bytes must be >= 0")
        if self.read_timeout <= 0:
            raise ValueError("read_timeout must be positive")
