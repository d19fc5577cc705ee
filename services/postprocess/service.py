"""The postprocess service: model outputs -> what the caller reads.

* ``loom.post.embed``  text embedding -> normalised embedding + top labels (TextOutput)
* ``loom.post.topics`` an embedding of text found elsewhere (OCR) -> topics of that output
* ``loom.post.ocr``    OCR lines -> ImageOutput.ocr; the text goes on down the slip
  (``pre.text`` -> ``infer.minilm`` -> ``post.topics``), or, when the image holds
  no text, the rest of that chain is skipped
* ``loom.post.vad``    speech probabilities -> speech segments and ratio (AudioOutput)

Every labelled part also carries all its label scores for late fusion. When the
part's pipeline spec says ``mask_pii``, the OCR text is masked
(:func:`services.common.pii.mask`) before it goes into the answer or on down
the chain.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from services.common import envelope, subjects
from services.common.errors import InvalidArgument
from services.common.lifecycle import Runtime, Service
from services.common.pb.loom.v1 import envelope_pb2 as pb
from services.common.pii import mask
from services.common.pipelines import PipelineRegistry
from services.common.stage import StageRunner, Stats
from services.common.tensors import tensor_to_strings, to_numpy
from services.postprocess.bootstrap import embed_labels
from services.postprocess.labels import LabelIndex, l2_normalise
from services.postprocess.ocr import joined_text, ocr_lines
from services.postprocess.settings import PostprocessSettings
from services.postprocess.speech import speech_ratio, speech_segments

#: One Silero VAD frame: 512 samples at 16 kHz.
VAD_FRAME_S = 0.032


def _tensor(part: pb.Part, name: str) -> np.ndarray:
    if name not in part.tensors:
        raise InvalidArgument(f"part has no {name!r} tensor (from {part.model or 'the model'})")
    return to_numpy(part.tensors[name])


class Postprocess(Service):
    name: ClassVar[str] = "postprocess"

    def __init__(self, settings: PostprocessSettings) -> None:
        super().__init__(settings)
        self.post = settings
        self.index: LabelIndex | None = None
        #: The pipeline specs, kept current from KV by the runtime (``mask_pii`` is read per part).
        self.pipelines = PipelineRegistry([])

    async def start(self, rt: Runtime) -> None:
        self.pipelines = rt.pipelines
        self.index = await embed_labels(
            rt.bus, self.post.labels, text_model=self.post.text_model, timeout_s=self.post.startup_timeout_s
        )
        stages = {
            "embed": self.handle_embed,
            "topics": self.handle_topics,
            "ocr": self.handle_ocr,
            "vad": self.handle_vad,
        }
        for task, handler in stages.items():
            await StageRunner(
                rt.bus,
                self.name,
                subjects.post(task),
                handler,
                claims=rt.claims,
                lane=rt.lane,
                pending_limit=rt.settings.stage_queue,
            ).start()

    def _label(self, part: pb.Part, out: pb.TextOutput | pb.ImageOutput) -> tuple[np.ndarray, Stats]:
        assert self.index is not None
        embedding = l2_normalise(_tensor(part, "embedding"))
        scores = self.index.scores(embedding)
        labels = self.index.top(embedding, self.post.top_k)
        target = out.labels if isinstance(out, pb.TextOutput) else out.topics
        del target[:]
        for label, score in labels:
            target.add(label=label, score=score)
        part.label_scores.clear()
        part.label_scores.update(scores)
        part.ClearField("tensors")
        return embedding, {"top_score": labels[0][1] if labels else 0.0}

    async def handle_embed(self, part: pb.Part) -> Stats:
        out = part.output.text
        out.model, out.model_version = part.model, part.model_version
        embedding, stats = self._label(part, out)
        out.embedding[:] = embedding.tolist()
        return stats

    async def handle_topics(self, part: pb.Part) -> Stats:
        # Topics belong to the output the chain started with (an image's text, ...).
        if part.output.WhichOneof("kind") == "image":
            return self._label(part, part.output.image)[1]
        return await self.handle_embed(part)

    def _masks_pii(self, part: pb.Part) -> bool:
        spec = self.pipelines.find(part.pipeline)
        return spec is not None and spec.mask_pii

    async def handle_ocr(self, part: pb.Part) -> Stats:
        texts = tensor_to_strings(part.tensors["text"]) if "text" in part.tensors else []
        masking = self._masks_pii(part)
        if masking:
            texts = [mask(text) for text in texts]
        scale = (part.context.get(envelope.IMAGE_SCALE_X, 1.0), part.context.get(envelope.IMAGE_SCALE_Y, 1.0))
        lines = ocr_lines(
            texts, _tensor(part, "score"), _tensor(part, "box"), scale=scale, min_score=self.post.ocr_min_score
        )
        out = part.output.image
        out.model, out.model_version = part.model, part.model_version
        for line in lines:
            out.ocr.add(text=line.text, score=line.score, box=list(line.box))
        # Masked again once joined: a number OCR split over two boxes is whole only here.
        out.text = part.text = mask(joined_text(lines)) if masking else joined_text(lines)
        part.ClearField("tensors")
        if not out.text:
            del part.slip[:-1]  # no text: nothing for the text model, straight to fusion
        scores = [line.score for line in lines]
        return {
            "ocr_lines": float(len(lines)),
            "ocr_chars": float(len(out.text)),
            "ocr_mean_score": float(np.mean(scores)) if scores else 0.0,
        }

    async def handle_vad(self, part: pb.Part) -> Stats:
        probs = _tensor(part, "speech_probs")
        out = part.output.audio
        duration = out.duration_s or len(probs) * VAD_FRAME_S
        segments = speech_segments(probs, frame_s=VAD_FRAME_S, threshold=self.post.vad_threshold, duration_s=duration)
        out.model, out.model_version = part.model, part.model_version
        for start, end in segments:
            out.speech_segments.add(start_s=start, end_s=end)
        out.speech_ratio = speech_ratio(segments, duration)
        out.duration_s = duration
        part.ClearField("tensors")
        return {"speech_ratio": out.speech_ratio, "speech_segments": float(len(segments))}
