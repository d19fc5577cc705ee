"""The inputs of one request from the command line, shared by ``predict`` and ``submit``.

``--text T`` is the ``text`` input, ``name=value`` a text input by name, and
``--file name=path`` a file sent base64-encoded (with its media type when the
name of the file gives one). The gateway checks them again; this only catches
what it cannot see, such as an unreadable file or an input given twice.
"""

from __future__ import annotations

import argparse
import base64
import mimetypes
from pathlib import Path
from typing import Any

from tools.loomctl.common import UsageError, pair


def add_input_options(p: argparse.ArgumentParser) -> None:
    """The options :func:`request_inputs` reads."""
    p.add_argument("inputs", nargs="*", metavar="name=value", help="text inputs by name")
    p.add_argument("--text", metavar="T", help="the 'text' input")
    p.add_argument("--file", metavar="name=path", action="append", default=[], help="a file input (image, audio)")


def request_inputs(args: argparse.Namespace) -> dict[str, Any]:
    """The ``inputs`` object of a ``:predict`` or ``:submit`` body."""
    inputs: dict[str, Any] = {}

    def put(name: str, value: Any) -> None:
        if name in inputs:
            raise UsageError(f"input {name!r} given twice")
        inputs[name] = value

    if args.text is not None:
        put("text", args.text)
    for item in args.inputs:
        put(*pair(item, "input"))
    for item in args.file:
        name, path = pair(item, "--file")
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise UsageError(f"--file {name}: cannot read {path}: {exc.strerror or exc}") from None
        entry = {"b64": base64.b64encode(data).decode("ascii")}
        ctype = mimetypes.guess_type(path)[0]
        if ctype:
            entry["content_type"] = ctype
        put(name, entry)
    if not inputs:
        raise UsageError("give at least one input: --text T, name=value or --file name=path")
    return inputs
