import pytest

from services.common.pb.loom.v1 import envelope_pb2 as pb
from services.fusion.collector import Collector, fuse
from services.fusion.settings import FusionSettings

pytestmark = pytest.mark.unit


def part(part_id: str, *, error: str = "", ids: tuple[str, ...] = ("text", "image")) -> pb.Part:
    p = pb.Part(request_id="r1", part_id=part_id, pipeline="content", reply_to="_INBOX.x.r1", part_ids=list(ids))
    p.deadline_unix_ms = 10_000
    p.timings_ms["inference"] = 5.0
    if error:
        p.error.code, p.error.message = error, "boom"
    else:
        p.output.text.model = "minilm"
    return p


def test_complete_when_every_part_arrived() -> None:
    c = Collector()
    state, complete = c.add(part("text"), now_ms=0)
    assert state is not None and not complete
    state, complete = c.add(part("image"), now_ms=1)
    assert complete
    result = fuse(c.finish("r1", now_ms=2))  # type: ignore[arg-type]
    assert set(result.response.outputs) == {"text", "image"}
    assert not result.response.degraded and not result.HasField("error")
    assert result.response.timings_ms["inference"] == 5.0


def test_deadline_answer_is_degraded_and_names_the_missing() -> None:
    c = Collector()
    c.add(part("text"), now_ms=0)
    result = fuse(c.finish("r1", now_ms=5))  # type: ignore[arg-type]
    assert result.response.degraded and list(result.response.missing) == ["image"]
    assert not result.HasField("error")


def test_failed_part_is_missing_with_its_error() -> None:
    c = Collector()
    c.add(part("text"), now_ms=0)
    c.add(part("image", error="UNAVAILABLE"), now_ms=0)
    result = fuse(c.finish("r1", now_ms=1))  # type: ignore[arg-type]
    assert result.response.degraded and result.response.errors["image"].code == "UNAVAILABLE"


def test_nothing_usable_is_an_error() -> None:
    c = Collector()
    c.add(part("text", error="UNAVAILABLE", ids=("text",)), now_ms=0)
    result = fuse(c.finish("r1", now_ms=1))  # type: ignore[arg-type]
    assert result.error.code == "UNAVAILABLE"
    empty = Collector()
    empty.add(part("text", ids=("text", "audio")), now_ms=0)
    state = empty.finish("r1", 1)
    assert state is not None
    state.parts.clear()
    assert fuse(state).error.code == "DEADLINE_EXCEEDED"


def test_late_and_duplicate_parts_are_ignored_then_forgotten() -> None:
    c = Collector(remember_ms=100)
    c.add(part("text"), now_ms=0)
    c.add(part("text"), now_ms=1)  # duplicate delivery
    assert len(c.pending["r1"].parts) == 1
    c.finish("r1", now_ms=2)
    assert c.add(part("image"), now_ms=50) == (None, False)
    state, _ = c.add(part("image"), now_ms=500)  # long after: a new request with that id
    assert state is not None


def test_replicas_split_partitions_without_overlap() -> None:
    owned = [
        set(FusionSettings(fusion_partitions=8, replica_index=i, replica_count=3).owned_partitions()) for i in range(3)
    ]
    assert set().union(*owned) == set(range(8))
    assert sum(len(o) for o in owned) == 8
