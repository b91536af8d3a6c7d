"""Type stubs for the Cython twin of :mod:`broker._pure.frames`."""

from collections.abc import Iterable
from typing import Final, Union

from typing_extensions import Buffer

__all__ = [
    "OP_CLOSE", "OP_REG", "OP_CID", "OP_SUB", "OP_SET", "OP_PUB", "OP_PNG",
    "OP_BADCRC", "OP_UNKNOWN", "OP_MALFORMED", "OP_ERROR", "OP_HEL",
    "CRC32_KERNEL", "FrameReader", "crc32", "encode_frame", "encode_pub",
    "encode_deliveries",
]

OP_CLOSE: Final[int]      # (OP_CLOSE, None, None): zero-length frame, client leaves
OP_REG: Final[int]        # (OP_REG, None, None)
OP_CID: Final[int]        # (OP_CID, client_id: bytes, None)
OP_SUB: Final[int]        # (OP_SUB, topic: bytes, None)
OP_SET: Final[int]        # (OP_SET, topic: bytes, offset: bytes)
OP_PUB: Final[int]        # (OP_PUB, topic: bytes, messages: list[bytes])
OP_PNG: Final[int]        # (OP_PNG, None, None)
OP_BADCRC: Final[int]     # (OP_BADCRC, topic: bytes, message_length: int)
OP_UNKNOWN: Final[int]    # (OP_UNKNOWN, first bytes of the body (<= 16), None)
OP_MALFORMED: Final[int]  # (OP_MALFORMED, command: bytes, reason: str)
OP_ERROR: Final[int]      # (OP_ERROR, reason: str, None): framing broken, reader stops
OP_HEL: Final[int]        # (OP_HEL, None, None): a first frame of type HEL; call detach()

CRC32_KERNEL: Final[str]  # "pclmulqdq" or "zlib": what computes CRC-32 here

Event = Union[
    tuple[int, None, None],
    tuple[int, bytes, None],
    tuple[int, bytes, bytes],
    tuple[int, bytes, list[bytes]],
    tuple[int, bytes, int],
    tuple[int, bytes, str],
    tuple[int, str, None],
]

class FrameReader:
    """Incremental v0 frame scanner (see :class:`broker._pure.frames.FrameReader`)."""

    max_frame_bytes: int
    def __init__(self, max_frame_bytes: int = ...) -> None: ...
    @property
    def buffered(self) -> int: ...
    @property
    def broken(self) -> bool: ...
    def feed(self, data: Buffer) -> list[Event]: ...
    def detach(self) -> bytes: ...

def crc32(data: Buffer, value: int = 0, /) -> int: ...
def encode_frame(body: Buffer) -> bytes: ...
def encode_pub(topic: Buffer, message: Buffer) -> bytes: ...
def encode_deliveries(topic: Buffer, messages: Iterable[Buffer]) -> bytes: ...
