"""Type stubs for the Cython twin of :mod:`broker._pure.records`."""

from collections.abc import Iterable
from typing import Final

from typing_extensions import Buffer

__all__ = [
    "HEADER_SIZE", "CorruptRecordError", "encode_records", "scan_records",
    "index_entries", "decode_records", "records_to_deliveries",
]

HEADER_SIZE: Final[int]

class CorruptRecordError(ValueError):
    """A record failed its CRC or offset check where a valid one must be."""

    position: int  # byte position of the bad record in the buffer
    reason: str    # what was wrong with it
    def __init__(self, position: int, reason: str) -> None: ...

def encode_records(messages: Iterable[Buffer], base_offset: int,
                   timestamp_ms: int) -> bytes: ...
def scan_records(buf: Buffer, expected_offset: int,
                 start: int = 0) -> tuple[int, int]: ...
def index_entries(buf: Buffer, base_position: int, next_index_position: int,
                  interval: int, segment_base_offset: int) -> tuple[bytes, int]: ...
def decode_records(buf: Buffer, from_offset: int, end_offset: int,
                   start: int = 0) -> tuple[list[tuple[int, int, bytes]], int]: ...
def records_to_deliveries(buf: Buffer, topic: Buffer, from_offset: int,
                          end_offset: int, max_bytes: int,
                          start: int = 0, verify: bool = True) -> tuple[bytes, int, int, int]: ...
