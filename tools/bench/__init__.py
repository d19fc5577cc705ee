"""``make bench``: Triton direct vs the same request through Loom's gateway.

One run starts the whole mesh (nats-server, tritonserver, six services) on free
127.0.0.1 ports and measures, per suite and concurrency level, the same input
three ways: Triton direct with the tensors the inference service would send,
the gateway over gRPC, and the gateway over HTTP.

* text suite:  ``minilm`` vs pipeline ``embed`` (one sentence);
* image suite: ``ocr`` alone vs the whole ``content`` chain (one phrase image:
  decode, OCR, the text model on the recognised text, fusion).

The load generator copies perf_analyzer's concurrency mode (closed loop, ``C``
workers). Results go to stderr as they come, a summary to stdout and the full
report to ``BENCHMARKS.md``.

Modules: :mod:`~tools.bench.cli` (options, mesh, main), :mod:`~tools.bench.load`
(closed loop, results, percentiles), :mod:`~tools.bench.targets` and the
per-suite ``text_targets``/``image_targets`` (the calls and their answer
checks), :mod:`~tools.bench.runner` (warm-up and levels),
:mod:`~tools.bench.triton_stats` and :mod:`~tools.bench.system` (what is read
around a level), ``report*``/``tables`` (Markdown and the console summary).
"""
