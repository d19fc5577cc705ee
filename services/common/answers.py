"""What an answer says about itself, for telemetry: the models behind it and its best label.

The gateway reports each Predict answer with these (``stage="gateway"``), fusion each
durable answer (``stage="loom.res"``); the monitor joins feedback to either by request id.
"""

from __future__ import annotations

from services.common.pb.loom.v1 import gateway_pb2

#: The telemetry stage of a durable answer, reported by fusion when it stores the result.
DURABLE_ANSWER_STAGE = "loom.res"


def answer_models(response: gateway_pb2.PredictResponse) -> tuple[str, str]:
    """The models behind an answer and their versions, e.g. ("minilm", "1") or ("minilm+ocr", "1+2")."""
    served: dict[str, str] = {}
    for out in response.outputs.values():
        kind = out.WhichOneof("kind")
        if kind is not None:
            inner = getattr(out, kind)
            if inner.model:
                served.setdefault(inner.model, inner.model_version)
    names = sorted(served)
    return "+".join(names), "+".join(served[n] for n in names)


def top_label(response: gateway_pb2.PredictResponse) -> str:
    """The answer's best label: the fused topics, else the first output's own labels."""
    if response.topics:
        return response.topics[0].label
    for name in sorted(response.outputs):
        out = response.outputs[name]
        labels = out.text.labels if out.HasField("text") else out.image.topics if out.HasField("image") else []
        if labels:
            return labels[0].label
    return ""
