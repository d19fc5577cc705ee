import numpy as np
import pytest

from services.common import envelope, subjects, tensors
from services.common.errors import InvalidArgument
from services.common.pb.loom.v1 import envelope_pb2 as pb

pytestmark = pytest.mark.unit


def test_slip_pops_own_step_and_moves_on() -> None:
    part = pb.Part(slip=["loom.pre.text", "loom.infer.minilm", "loom.fuse.2"])
    envelope.pop_step(part, "loom.pre.text")
    assert envelope.next_subject(part) == "loom.infer.minilm"
    envelope.pop_step(part, "loom.post.embed")  # not ours: left alone
    assert list(part.slip) == ["loom.infer.minilm", "loom.fuse.2"]


def test_failed_part_skips_to_fusion() -> None:
    part = pb.Part(slip=["loom.infer.minilm", "loom.post.embed", "loom.fuse.0"])
    part.error.code = "UNAVAILABLE"
    assert envelope.next_subject(part) == "loom.fuse.0"
    assert envelope.next_subject(pb.Part()) is None


def test_deadline_and_request_ids() -> None:
    assert envelope.expired(pb.Part(deadline_unix_ms=envelope.now_ms() - 1))
    assert not envelope.expired(pb.Part(deadline_unix_ms=envelope.now_ms() + 10_000))
    assert envelope.check_request_id("abc-DEF_123") == "abc-DEF_123"
    for bad in ["", "a.b", "a b", "x" * 65, "loom.>"]:
        with pytest.raises(InvalidArgument):
            envelope.check_request_id(bad)


def test_partition_is_stable_and_in_range() -> None:
    ids = [envelope.new_request_id() for _ in range(200)]
    parts = {subjects.fuse_partition(i, 4) for i in ids}
    assert parts == {0, 1, 2, 3}
    assert all(subjects.fuse_partition(i, 4) == subjects.fuse_partition(i, 4) for i in ids)
    assert subjects.fuse(3) == "loom.fuse.3" and subjects.infer("minilm") == "loom.infer.minilm"


def test_tensor_round_trip_and_checks() -> None:
    array = np.arange(12, dtype=np.int64).reshape(3, 4)
    t = tensors.from_numpy(array)
    assert t.datatype == "INT64" and list(t.shape) == [3, 4]
    np.testing.assert_array_equal(tensors.to_numpy(t), array)
    with pytest.raises(InvalidArgument):
        tensors.to_numpy(pb.Tensor(datatype="FP32", shape=[2], data=b"\x00" * 4))
    with pytest.raises(InvalidArgument):
        tensors.to_numpy(pb.Tensor(datatype="COMPLEX", shape=[1], data=b""))
