"""Micro-batching logic (grouping, padding, size, delay, errors, deadlines) and the BYTES tensor helpers."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
from prometheus_client import REGISTRY
from tritonclient.utils import serialize_byte_tensor

from services.common.errors import DeadlineExceeded, InvalidArgument, Unavailable
from services.common.pb.loom.v1 import envelope_pb2 as pb
from services.common.tensors import strings_to_tensor, tensor_to_strings
from services.inference.batcher import MicroBatcher, compat_key, stack
from services.inference.triton import from_tensor, to_tensor

pytestmark = pytest.mark.unit


def tokens(n: int, mask_len: int | None = None) -> dict[str, np.ndarray]:
    return {
        "input_ids": np.arange(1, n + 1, dtype=np.int64),
        "attention_mask": np.ones(n if mask_len is None else mask_len, np.int64),
    }


class Recorder:
    """A fake run_batch: records each batch, answers each item with itself doubled."""

    def __init__(self, delay_s: float = 0.0, fail: Exception | None = None) -> None:
        self.batches: list[list[int]] = []
        self.delay_s = delay_s
        self.fail = fail

    async def __call__(self, items: list[int]) -> list[int | BaseException]:
        self.batches.append(list(items))
        await asyncio.sleep(self.delay_s)
        if self.fail is not None:
            raise self.fail
        return [InvalidArgument(f"bad {i}") if i < 0 else 2 * i for i in items]


def test_compat_key_groups_by_names_dtypes_and_shapes() -> None:
    a = {"x": np.zeros((3, 2), np.float32)}
    assert compat_key(a, pad=False) == compat_key({"x": np.ones((3, 2), np.float32)}, pad=False)
    assert compat_key(a, pad=False) != compat_key({"x": np.zeros((4, 2), np.float32)}, pad=False)
    assert compat_key(a, pad=False) != compat_key({"x": np.zeros((3, 2), np.float64)}, pad=False)
    assert compat_key(a, pad=False) != compat_key({"y": np.zeros((3, 2), np.float32)}, pad=False)
    # 1-D tensors of different lengths: compatible only for pad models
    assert compat_key(tokens(5), pad=False) != compat_key(tokens(9), pad=False)
    assert compat_key(tokens(5), pad=True) == compat_key(tokens(9), pad=True)
    # an item whose own tensors disagree in length is never padded into company
    assert compat_key(tokens(5, mask_len=4), pad=True) != compat_key(tokens(5), pad=True)


def test_stack_right_pads_1d_with_zeros_and_stacks_the_rest() -> None:
    batch = stack([tokens(2), tokens(4)])
    np.testing.assert_array_equal(batch["input_ids"], [[1, 2, 0, 0], [1, 2, 3, 4]])
    np.testing.assert_array_equal(batch["attention_mask"], [[1, 1, 0, 0], [1, 1, 1, 1]])
    assert batch["input_ids"].dtype == np.int64
    images = stack([{"image": np.full((2, 3, 3), i, np.uint8)} for i in range(3)])
    assert images["image"].shape == (3, 2, 3, 3)
    assert images["image"][2].max() == 2


async def test_concurrent_items_share_one_batch_capped_at_max_size() -> None:
    run = Recorder()
    batcher: MicroBatcher[int, int] = MicroBatcher(run, max_batch_size=4, max_delay_s=0.05, name="t-size")
    results = await asyncio.gather(*(batcher.submit(i) for i in range(10)))
    assert results == [2 * i for i in range(10)]
    assert [len(b) for b in run.batches] == [4, 4, 2]
    assert sorted(i for b in run.batches for i in b) == list(range(10))
    assert REGISTRY.get_sample_value("loom_inference_batch_size_count", {"model": "t-size"}) == 3


async def test_a_lone_item_waits_at_most_the_delay() -> None:
    run = Recorder()
    batcher: MicroBatcher[int, int] = MicroBatcher(run, max_batch_size=16, max_delay_s=0.03, name="t-delay")
    started = time.monotonic()
    assert await batcher.submit(7) == 14
    waited = time.monotonic() - started
    assert 0.025 <= waited < 0.5
    assert run.batches == [[7]]
    # an item arriving after dispatch starts the next batch
    first = asyncio.ensure_future(batcher.submit(1))
    await asyncio.sleep(0.06)
    second = asyncio.ensure_future(batcher.submit(2))
    assert list(await asyncio.gather(first, second)) == [2, 4]
    assert run.batches[1:] == [[1], [2]]


async def test_when_idle_a_lone_item_goes_at_once_and_the_rest_batch_behind_it() -> None:
    run = Recorder(delay_s=0.05)
    batcher: MicroBatcher[int, int] = MicroBatcher(
        run, max_batch_size=16, max_delay_s=1.0, name="t-idle", dispatch_when_idle=True
    )
    started = time.monotonic()
    assert await batcher.submit(3) == 6
    assert time.monotonic() - started < 0.5  # not the 1 s batching delay
    # While that first batch runs, the others gather behind it and go as soon as it is done.
    started = time.monotonic()
    results = await asyncio.gather(*(batcher.submit(i) for i in range(6)))
    assert results == [2 * i for i in range(6)]
    assert time.monotonic() - started < 0.5
    assert [len(b) for b in run.batches] == [1, 1, 5]


async def test_incompatible_items_go_in_separate_batches() -> None:
    calls: list[list[int]] = []

    async def run(items: list[dict[str, np.ndarray]]) -> list[int]:
        calls.append([len(item["input_ids"]) for item in items])
        return [len(item["input_ids"]) for item in items]

    padded: MicroBatcher[dict[str, np.ndarray], int] = MicroBatcher(
        run, max_delay_s=0.01, key=lambda item: compat_key(item, pad=True)
    )
    assert await asyncio.gather(*(padded.submit(tokens(n)) for n in (3, 5, 8))) == [3, 5, 8]
    assert calls == [[3, 5, 8]]

    calls.clear()
    exact: MicroBatcher[dict[str, np.ndarray], int] = MicroBatcher(
        run, max_delay_s=0.01, key=lambda item: compat_key(item, pad=False)
    )
    assert await asyncio.gather(*(exact.submit(tokens(n)) for n in (3, 5, 3))) == [3, 5, 3]
    assert sorted(calls) == [[3, 3], [5]]


async def test_a_failing_batch_fails_every_caller_and_item_errors_stay_with_their_item() -> None:
    run = Recorder(fail=Unavailable("Triton is unavailable"))
    batcher: MicroBatcher[int, int] = MicroBatcher(run, max_delay_s=0.01)
    results = await asyncio.gather(*(batcher.submit(i) for i in range(3)), return_exceptions=True)
    assert len(run.batches) == 1
    assert all(isinstance(r, Unavailable) for r in results), results

    mixed: MicroBatcher[int, int] = MicroBatcher(Recorder(), max_delay_s=0.01)
    results = await asyncio.gather(*(mixed.submit(i) for i in (1, -1, 2)), return_exceptions=True)
    assert results[0] == 2 and results[2] == 4
    assert isinstance(results[1], InvalidArgument)


async def test_wrong_number_of_results_is_internal_for_all() -> None:
    async def short(items: list[int]) -> list[int]:
        return items[:-1]

    batcher: MicroBatcher[int, int] = MicroBatcher(short, max_delay_s=0.01)
    results = await asyncio.gather(*(batcher.submit(i) for i in range(3)), return_exceptions=True)
    assert all("2 results for a batch of 3" in str(r) for r in results), results


async def test_a_caller_past_its_deadline_gets_deadline_exceeded_and_the_rest_are_served() -> None:
    run = Recorder(delay_s=0.1)
    batcher: MicroBatcher[int, int] = MicroBatcher(run, max_delay_s=0.01)
    hurried = asyncio.ensure_future(batcher.submit(1, timeout_s=0.05))
    patient = [asyncio.ensure_future(batcher.submit(i, timeout_s=2.0)) for i in (2, 3)]
    with pytest.raises(DeadlineExceeded):
        await hurried
    assert await asyncio.gather(*patient) == [4, 6]
    assert run.batches == [[1, 2, 3]]  # it had been dispatched: its answer is just dropped


async def test_a_caller_that_gives_up_before_dispatch_leaves_the_batch() -> None:
    run = Recorder()
    batcher: MicroBatcher[int, int] = MicroBatcher(run, max_delay_s=0.1)
    gone = asyncio.ensure_future(batcher.submit(1, timeout_s=0.01))
    cancelled = asyncio.ensure_future(batcher.submit(2))
    kept = asyncio.ensure_future(batcher.submit(3))
    await asyncio.sleep(0.03)
    cancelled.cancel()
    with pytest.raises(DeadlineExceeded):
        await gone
    assert await kept == 6
    assert run.batches == [[3]]


async def test_items_whose_callers_gave_up_before_dispatch_count_as_deadline_drops_of_the_model() -> None:
    labels = {"service": "inference", "stage": "loom.infer.dropmodel"}
    before = REGISTRY.get_sample_value("loom_deadline_drops_total", labels) or 0.0
    run = Recorder()
    batcher: MicroBatcher[int, int] = MicroBatcher(run, max_delay_s=0.1, name="dropmodel")
    late = [asyncio.ensure_future(batcher.submit(i, timeout_s=0.01)) for i in (1, 2)]
    kept = asyncio.ensure_future(batcher.submit(3))
    for fut in late:
        with pytest.raises(DeadlineExceeded):
            await fut
    assert await kept == 6 and run.batches == [[3]]  # never sent to Triton
    assert REGISTRY.get_sample_value("loom_deadline_drops_total", labels) == before + 2

    # A caller that gives up after its batch went is no drop: the work was done, its answer discarded.
    slow = MicroBatcher(Recorder(delay_s=0.1), max_delay_s=0.0, name="dropmodel", dispatch_when_idle=True)
    with pytest.raises(DeadlineExceeded):
        await slow.submit(4, timeout_s=0.02)
    await slow.close()
    assert REGISTRY.get_sample_value("loom_deadline_drops_total", labels) == before + 2


async def test_close_dispatches_what_is_pending_then_refuses() -> None:
    run = Recorder()
    batcher: MicroBatcher[int, int] = MicroBatcher(run, max_delay_s=10.0)
    waiting = asyncio.ensure_future(batcher.submit(5))
    await asyncio.sleep(0)
    await batcher.close()
    assert await waiting == 10
    with pytest.raises(Unavailable):
        await batcher.submit(1)


def test_bytes_tensor_is_kserve_raw_serialisation_and_round_trips() -> None:
    strings = ["hello", "", "naïve — ünïcode", "中文"]
    tensor = strings_to_tensor(strings)
    assert tensor.datatype == "BYTES" and list(tensor.shape) == [4]
    expected = serialize_byte_tensor(np.array([s.encode() for s in strings], dtype=object)).item()
    assert tensor.data == expected
    assert tensor_to_strings(tensor) == strings
    # an output row as the Triton client returns it (object array of str) keeps its shape
    grid = np.array([["a", "b"], ["c", "d"]], dtype=object)
    as_tensor = to_tensor(grid)
    assert list(as_tensor.shape) == [2, 2] and tensor_to_strings(as_tensor) == ["a", "b", "c", "d"]
    assert from_tensor(as_tensor).tolist() == [[b"a", b"b"], [b"c", b"d"]]
    empty = strings_to_tensor([])
    assert list(empty.shape) == [0] and empty.data == b"" and tensor_to_strings(empty) == []
    # numeric outputs still go through the numeric conversion
    assert to_tensor(np.ones(3, np.float32)).datatype == "FP32"


def test_malformed_bytes_tensors_are_invalid_argument() -> None:
    with pytest.raises(InvalidArgument, match="BYTES"):
        tensor_to_strings(pb.Tensor(datatype="FP32", shape=[1], data=b"\0\0\0\0"))
    with pytest.raises(InvalidArgument, match="past the end"):
        tensor_to_strings(pb.Tensor(datatype="BYTES", shape=[1], data=b"\x09\0\0\0abc"))
    with pytest.raises(InvalidArgument, match="holds 1 elements"):
        tensor_to_strings(pb.Tensor(datatype="BYTES", shape=[2], data=b"\x01\0\0\0a"))
