"""One error hierarchy for Loom, and one table mapping it to every transport.

A stage raises a :class:`LoomError` subclass; adapters translate it with
:func:`grpc_status`, :func:`http_status` and :func:`nats_headers`. Anything
else becomes INTERNAL with a generic message (the details go to the log).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

import grpc

from services.common.pb.loom.v1 import envelope_pb2 as pb


class Code(StrEnum):
    OK = "OK"
    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    NOT_FOUND = "NOT_FOUND"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    UNAVAILABLE = "UNAVAILABLE"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    UNAUTHENTICATED = "UNAUTHENTICATED"
    PERMISSION_DENIED = "PERMISSION_DENIED"
    FAILED_PRECONDITION = "FAILED_PRECONDITION"
    ALREADY_EXISTS = "ALREADY_EXISTS"
    INTERNAL = "INTERNAL"


@dataclass(frozen=True)
class Mapping:
    grpc: grpc.StatusCode
    http: int


# The one table. NATS error headers reuse the HTTP number, as NATS micro does.
TABLE: dict[Code, Mapping] = {
    Code.OK: Mapping(grpc.StatusCode.OK, 200),
    Code.INVALID_ARGUMENT: Mapping(grpc.StatusCode.INVALID_ARGUMENT, 400),
    Code.NOT_FOUND: Mapping(grpc.StatusCode.NOT_FOUND, 404),
    Code.RESOURCE_EXHAUSTED: Mapping(grpc.StatusCode.RESOURCE_EXHAUSTED, 413),
    Code.UNAVAILABLE: Mapping(grpc.StatusCode.UNAVAILABLE, 503),
    Code.DEADLINE_EXCEEDED: Mapping(grpc.StatusCode.DEADLINE_EXCEEDED, 504),
    Code.UNAUTHENTICATED: Mapping(grpc.StatusCode.UNAUTHENTICATED, 401),
    Code.PERMISSION_DENIED: Mapping(grpc.StatusCode.PERMISSION_DENIED, 403),
    Code.FAILED_PRECONDITION: Mapping(grpc.StatusCode.FAILED_PRECONDITION, 412),
    Code.ALREADY_EXISTS: Mapping(grpc.StatusCode.ALREADY_EXISTS, 409),
    Code.INTERNAL: Mapping(grpc.StatusCode.INTERNAL, 500),
}

_CODE_BY_HTTP = {m.http: code for code, m in TABLE.items()}

NATS_ERROR = "Nats-Service-Error"
NATS_ERROR_CODE = "Nats-Service-Error-Code"
GENERIC_INTERNAL = "internal error"


class LoomError(Exception):
    """Base of every error Loom reports to a caller."""

    code: Code = Code.INTERNAL

    def __init__(self, message: str, *, code: Code | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.code}: {self.message!r})"


class InvalidArgument(LoomError):
    code = Code.INVALID_ARGUMENT


class NotFound(LoomError):
    code = Code.NOT_FOUND


class ResourceExhausted(LoomError):
    code = Code.RESOURCE_EXHAUSTED


class Unavailable(LoomError):
    code = Code.UNAVAILABLE


class DeadlineExceeded(LoomError):
    code = Code.DEADLINE_EXCEEDED


class Internal(LoomError):
    code = Code.INTERNAL


class FailedPrecondition(LoomError):
    """The request is well formed but the system is not in a state that allows it."""

    code = Code.FAILED_PRECONDITION


class AlreadyExists(LoomError):
    code = Code.ALREADY_EXISTS


class Unauthenticated(LoomError):
    """No credentials, or credentials that do not prove who the caller is (unknown key, bad or expired token)."""

    code = Code.UNAUTHENTICATED


class PermissionDenied(LoomError):
    """The caller is known, but none of its roles allows what it asked for."""

    code = Code.PERMISSION_DENIED


_BY_CODE: dict[Code, type[LoomError]] = {
    cls.code: cls
    for cls in (
        InvalidArgument,
        NotFound,
        ResourceExhausted,
        Unavailable,
        DeadlineExceeded,
        Internal,
        FailedPrecondition,
        AlreadyExists,
        Unauthenticated,
        PermissionDenied,
    )
}


def from_code(code: str, message: str) -> LoomError:
    """Rebuild an error received from another service."""
    try:
        parsed = Code(code)
    except ValueError:
        parsed = Code.INTERNAL
    return _BY_CODE.get(parsed, LoomError)(message, code=parsed)


def as_loom_error(exc: BaseException) -> LoomError:
    """A LoomError as is; anything else becomes a generic INTERNAL."""
    if isinstance(exc, LoomError):
        return exc
    return Internal(GENERIC_INTERNAL)


def to_proto(err: LoomError, service: str = "") -> pb.Error:
    return pb.Error(code=str(err.code), message=err.message, service=service)


def from_proto(err: pb.Error) -> LoomError:
    return from_code(err.code, err.message)


def grpc_status(err: LoomError) -> grpc.StatusCode:
    return TABLE[err.code].grpc


def http_status(err: LoomError) -> int:
    return TABLE[err.code].http


def http_body(err: LoomError, **extra: str) -> dict[str, object]:
    """The JSON error body every HTTP endpoint returns."""
    return {"error": {"code": str(err.code), "message": err.message, **extra}}


def nats_headers(err: LoomError) -> dict[str, str]:
    return {NATS_ERROR: err.message, NATS_ERROR_CODE: str(http_status(err))}


def error_from_nats_headers(headers: dict[str, str]) -> LoomError:
    """Rebuild an error from a NATS reply's service-error headers."""
    try:
        code = _CODE_BY_HTTP.get(int(headers.get(NATS_ERROR_CODE, "500")), Code.INTERNAL)
    except ValueError:
        code = Code.INTERNAL
    return from_code(code, headers.get(NATS_ERROR, "error"))
