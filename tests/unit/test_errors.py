import grpc
import pytest

from services.common import errors
from services.common.errors import Code

pytestmark = pytest.mark.unit


def test_every_code_has_one_mapping() -> None:
    assert set(errors.TABLE) == set(Code)
    assert errors.TABLE[Code.INVALID_ARGUMENT] == errors.Mapping(grpc.StatusCode.INVALID_ARGUMENT, 400)
    assert errors.TABLE[Code.NOT_FOUND].http == 404
    assert errors.TABLE[Code.RESOURCE_EXHAUSTED].http == 413
    assert errors.TABLE[Code.UNAVAILABLE] == errors.Mapping(grpc.StatusCode.UNAVAILABLE, 503)
    assert errors.TABLE[Code.DEADLINE_EXCEEDED].http == 504


def test_round_trip_through_proto() -> None:
    err = errors.Unavailable("Triton is down")
    back = errors.from_proto(errors.to_proto(err, "inference"))
    assert isinstance(back, errors.Unavailable) and back.message == "Triton is down"
    assert errors.to_proto(err, "inference").service == "inference"


def test_unknown_code_and_foreign_exceptions_become_internal() -> None:
    assert errors.from_code("WHAT", "x").code is Code.INTERNAL
    hidden = errors.as_loom_error(KeyError("secret detail"))
    assert hidden.code is Code.INTERNAL and "secret" not in hidden.message


def test_transport_renderings() -> None:
    err = errors.InvalidArgument("text is empty")
    assert errors.grpc_status(err) is grpc.StatusCode.INVALID_ARGUMENT
    assert errors.http_status(err) == 400
    assert errors.http_body(err) == {"error": {"code": "INVALID_ARGUMENT", "message": "text is empty"}}
    assert errors.nats_headers(err) == {"Nats-Service-Error": "text is empty", "Nats-Service-Error-Code": "400"}
