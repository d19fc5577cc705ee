"""Pipeline specs: the shipped YAML validates, bad specs are refused with a message, weighted fusion."""

import pytest

from services.common.errors import InvalidArgument, NotFound
from services.common.pb.loom.v1 import envelope_pb2 as pb
from services.common.pipelines import PipelineRegistry, default_dir, load_dir, parse_spec, to_yaml
from services.fusion.collector import Collector, fuse, weighted_topics

pytestmark = pytest.mark.unit


def test_shipped_specs_validate_and_declare_the_ocr_chain() -> None:
    specs = {s.name: s for s in load_dir(default_dir())}
    assert set(specs) >= {"embed", "content"}
    image = specs["content"].inputs["image"]
    # The chain: OCR, then the recognised text through the text model.
    assert image.subjects() == [
        "loom.pre.image",
        "loom.infer.ocr",
        "loom.post.ocr",
        "loom.pre.text",
        "loom.infer.minilm",
        "loom.post.topics",
    ]
    assert not any(i.required for i in specs["content"].inputs.values())
    assert specs["content"].fusion.strategy == "weighted"


def test_round_trip_through_yaml() -> None:
    spec = PipelineRegistry().get("content")
    assert parse_spec(to_yaml(spec), name="content") == spec


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("name: x\ninputs: {}", "inputs"),
        ("name: x\ninputs: {t: {modality: video, stages: [pre.text]}}", "modality"),
        ("name: x\ninputs: {t: {modality: text, stages: [loom.pre.text]}}", "not of the form"),
        ("name: x\ninputs: {t: {modality: text, stages: [pre.text], colour: red}}", "colour"),
        ("name: X!\ninputs: {t: {modality: text, stages: [pre.text]}}", "name"),
        ("name: x\ndeadline_ms: -5\ninputs: {t: {modality: text, stages: [pre.text]}}", "deadline_ms"),
        (
            "name: x\nfusion: {strategy: weighted}\ninputs: {t: {modality: text, stages: [pre.text], weight: 0}}",
            "weight",
        ),
        ("[1, 2", "not valid YAML"),
        ("- just\n- a list", "mapping"),
    ],
)
def test_invalid_specs_are_refused_with_a_message(text: str, says: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        parse_spec(text)
    assert says in info.value.message


def test_a_spec_stored_under_another_name_is_refused() -> None:
    with pytest.raises(InvalidArgument, match="stored as"):
        parse_spec("name: other\ninputs: {t: {modality: text, stages: [pre.text]}}", name="mine")


def test_registry_names_the_known_pipelines_for_an_unknown_one() -> None:
    with pytest.raises(NotFound, match="content, embed"):
        PipelineRegistry().get("nope")


def _labelled(part_id: str, scores: dict[str, float]) -> pb.Part:
    p = pb.Part(request_id="r", part_id=part_id, pipeline="content", part_ids=["text", "image", "audio"])
    p.label_scores.update(scores)
    return p


def test_weighted_topics_is_a_weighted_mean_over_parts_with_scores() -> None:
    parts = [
        _labelled("text", {"sports": 0.8, "music": 0.2}),
        _labelled("image", {"sports": 0.2, "music": 0.6}),
        _labelled("audio", {}),  # no labels: does not dilute the mean
    ]
    fused = dict(weighted_topics(parts, {"text": 1.0, "image": 0.5, "audio": 1.0}, top_k=5))
    assert fused["sports"] == pytest.approx((0.8 * 1.0 + 0.2 * 0.5) / 1.5)
    assert fused["music"] == pytest.approx((0.2 * 1.0 + 0.6 * 0.5) / 1.5)
    assert list(fused) == ["sports", "music"]
    # Weight 0 leaves a part out; with every weight 0 there is nothing to fuse.
    only_image = weighted_topics(parts, {"text": 0.0, "image": 1.0}, top_k=1)
    assert only_image == [("music", pytest.approx(0.6))]
    assert weighted_topics(parts, {"text": 0.0, "image": 0.0, "audio": 0.0}, top_k=3) == []


def test_fuse_uses_the_spec_strategy() -> None:
    spec = PipelineRegistry().get("content")
    c = Collector()
    text = _labelled("text", {"sports": 0.9, "food": 0.1})
    text.part_ids[:] = ["text", "image"]
    text.output.text.model = "minilm"
    c.add(text, now_ms=0)
    state = c.finish("r", now_ms=1)
    assert state is not None
    result = fuse(state, spec)
    assert [t.label for t in result.response.topics] == ["sports", "food"]
    assert result.response.degraded and list(result.response.missing) == ["image"]
    attach_only = fuse(state, PipelineRegistry().get("embed"))
    assert not attach_only.response.topics
