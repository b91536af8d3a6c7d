"""Exceptions raised by the client library, one per broker error code."""

from __future__ import annotations

from ..errors import ErrorCode

__all__ = [
    "PyLogStreamsError", "ConnectionLost", "BrokerError", "BadFrame", "FrameTooLarge",
    "UnknownCommand", "BadRequest", "UnsupportedVersion", "NotIdentified", "InvalidTopicError",
    "BadChecksum", "StorageError", "InvalidOffset", "NotSubscribed", "AlreadySubscribed",
    "LimitExceeded", "Unauthorized", "error_for",
]


class PyLogStreamsError(Exception):
    """Base class of every error the client raises."""


class ConnectionLost(PyLogStreamsError, ConnectionError):
    """The connection closed before the request was answered."""


class BrokerError(PyLogStreamsError):
    """The broker refused a request (an ``ERR`` frame)."""

    code: ErrorCode | int = 0

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code


class BadFrame(BrokerError):
    code = ErrorCode.BAD_FRAME


class FrameTooLarge(BrokerError):
    code = ErrorCode.FRAME_TOO_LARGE


class UnknownCommand(BrokerError):
    code = ErrorCode.UNKNOWN_COMMAND


class BadRequest(BrokerError):
    code = ErrorCode.BAD_REQUEST


class UnsupportedVersion(BrokerError):
    code = ErrorCode.UNSUPPORTED_VERSION


class NotIdentified(BrokerError):
    code = ErrorCode.NOT_IDENTIFIED


class InvalidTopicError(BrokerError):
    code = ErrorCode.INVALID_TOPIC


class BadChecksum(BrokerError):
    code = ErrorCode.BAD_CRC


class StorageError(BrokerError):
    code = ErrorCode.STORAGE_ERROR


class InvalidOffset(BrokerError):
    code = ErrorCode.INVALID_OFFSET


class NotSubscribed(BrokerError):
    code = ErrorCode.NOT_SUBSCRIBED


class AlreadySubscribed(BrokerError):
    code = ErrorCode.ALREADY_SUBSCRIBED


class LimitExceeded(BrokerError):
    code = ErrorCode.LIMIT_EXCEEDED


class Unauthorized(BrokerError):
    code = ErrorCode.UNAUTHORIZED


_BY_CODE = {cls.code: cls for cls in BrokerError.__subclasses__()}


def error_for(code: int, text: str) -> BrokerError:
    """The exception for an ``ERR`` frame's code (BrokerError if unknown)."""
    cls = _BY_CODE.get(code, BrokerError)
    return cls("%s (code %d)" % (text, code), code)
