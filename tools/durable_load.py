"""Durable traffic for the chaos and multi-host runs: what they submit, and how they count the answers.

Requests are ``loom.v1.SubmitRequest`` with an idempotency key each; answers are counted
from the result stream LOOM_RES (every ``loom.res.>`` message), so a request answered twice
shows up as a duplicate and one never answered as lost.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

import nats
from nats.js.api import DeliverPolicy

from services.common import durable
from services.common.pb.loom.v1 import gateway_pb2

WORDS = [
    "river",
    "market",
    "engine",
    "garden",
    "signal",
    "winter",
    "station",
    "paper",
    "orbit",
    "canvas",
    "ledger",
    "harbor",
]


def submit_request(rng: random.Random, key: str) -> gateway_pb2.SubmitRequest:
    """A durable ``embed`` request of a random sentence, with ``key`` as its idempotency key."""
    req = gateway_pb2.PredictRequest(pipeline="embed", timeout_ms=1_800_000)
    req.inputs["text"].text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 14))).capitalize() + "."
    return gateway_pb2.SubmitRequest(request=req, idempotency_key=key)


@dataclass(frozen=True)
class Media:
    """The files of multi-part ``content`` requests: a few images of text, a short tone."""

    images: list[bytes]
    audio: bytes

    @classmethod
    def make(cls) -> Media:
        from tests.media import text_image, tone_wav  # Pillow and a font: only where content requests go

        phrases = ["river market", "engine garden", "signal winter", "station paper"]
        return cls([text_image(p) for p in phrases], tone_wav(seconds=1.0))


def content_request(rng: random.Random, key: str, media: Media, audio: bool) -> gateway_pb2.SubmitRequest:
    """A durable multi-part ``content`` request: text and an image (and audio): fusion joins the parts."""
    req = gateway_pb2.PredictRequest(pipeline="content", timeout_ms=1_800_000)
    req.inputs["text"].text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 10))).capitalize() + "."
    req.inputs["image"].data = rng.choice(media.images)
    if audio:
        req.inputs["audio"].data = media.audio
    return gateway_pb2.SubmitRequest(request=req, idempotency_key=key)


@dataclass(frozen=True)
class Tally:
    """Accepted requests against the answers in LOOM_RES."""

    completed: int  # accepted ids answered DONE only
    failed: int  # accepted ids answered otherwise
    lost: list[str]  # accepted ids without any answer
    duplicated: int  # answers beyond the first for one id


def account(accepted: Iterable[str], counts: Counter[str]) -> Tally:
    """``counts`` is :func:`count_results`'s "id|STATE" -> n."""
    answered: Counter[str] = Counter()
    states: dict[str, set[str]] = defaultdict(set)
    for key, n in counts.items():
        rid, state = key.split("|")
        answered[rid] += n
        states[rid].add(state)
    ids = list(accepted)
    return Tally(
        completed=sum(1 for rid in ids if states.get(rid) == {"DONE"}),
        failed=sum(1 for rid in ids if rid in states and states[rid] != {"DONE"}),
        lost=[rid for rid in ids if rid not in answered],
        duplicated=sum(c - 1 for c in answered.values() if c > 1),
    )


async def count_results(urls: str) -> Counter[str]:
    """Every answer the result stream holds, by request id; states by id in ``count_results.states``."""
    nc = await nats.connect(urls.split(","))
    counts: Counter[str] = Counter()
    try:
        js = nc.jetstream()
        info = await js.stream_info(durable.RES_STREAM)
        total = info.state.messages
        sub = await js.subscribe("loom.res.>", ordered_consumer=True, deliver_policy=DeliverPolicy.ALL)
        seen = 0
        while seen < total:
            msg = await sub.next_msg(timeout=10)
            seen += 1
            result = gateway_pb2.Result.FromString(msg.data)
            counts[f"{result.request_id}|{gateway_pb2.Result.State.Name(result.state)}"] += 1
    finally:
        await nc.close()
    return counts


async def stream_count(urls: str, stream: str) -> int:
    nc = await nats.connect(urls.split(","))
    try:
        return int((await nc.jetstream().stream_info(stream)).state.messages)
    finally:
        await nc.close()


def count_stream(urls: str, stream: str, timeout: float = 60.0) -> int:
    """Messages in ``stream``; retried while a lost node's streams elect new leaders (bounded)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return asyncio.run(asyncio.wait_for(stream_count(urls, stream), 10))
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(1.0)


def wait_answers(urls: str, want: int, timeout: float) -> int:
    """Wait (bounded) until LOOM_RES holds ``want`` answers; how many it holds."""
    deadline, seen = time.monotonic() + timeout, 0
    while time.monotonic() < deadline:
        seen = count_stream(urls, durable.RES_STREAM)
        if seen >= want:
            break
        time.sleep(1.0)
    return seen
