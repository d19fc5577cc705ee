"""A results bucket without a leader is Unavailable (clients retry), never an internal error."""

from __future__ import annotations

from typing import Any

import nats.errors
import pytest
from nats.js.errors import KeyWrongLastSequenceError
from nats.js.errors import NotFoundError as JsNotFound

from services.common import durable
from services.common.errors import Unavailable
from services.common.results import Result, ResultStore

pytestmark = pytest.mark.unit


class SilentBucket:
    """A KV whose stream lost its leader: every call times out (or says what it is told to)."""

    def __init__(self, exc: Exception) -> None:
        self.exc = exc

    async def get(self, key: str) -> Any:
        raise self.exc

    async def create(self, key: str, value: bytes) -> int:
        raise self.exc

    async def put(self, key: str, value: bytes) -> int:
        raise self.exc


def store(exc: Exception) -> ResultStore:
    results = ResultStore(bus=None, lane=durable.LaneSettings())  # type: ignore[arg-type]
    results._kv = SilentBucket(exc)  # type: ignore[assignment]
    return results


async def test_timeouts_become_unavailable() -> None:
    results = store(nats.errors.TimeoutError())
    with pytest.raises(Unavailable, match="could not read a result"):
        await results.find("r1")
    with pytest.raises(Unavailable, match="could not record a request"):
        await results.create_pending("r1", "embed", "t", 1)
    with pytest.raises(Unavailable, match="could not keep an answer"):
        await results.answer(Result(request_id="r1", pipeline="embed"))


async def test_absent_and_existing_keys_are_not_errors() -> None:
    assert await store(JsNotFound()).find("r1") is None
    await store(KeyWrongLastSequenceError()).create_pending("r1", "embed", "t", 1)
