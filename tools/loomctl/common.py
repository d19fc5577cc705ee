"""What every loomctl command shares: exit codes, the usage error, clients and small output helpers."""

from __future__ import annotations

import argparse
import urllib.parse
from collections.abc import Callable
from typing import Any

from tools.loomctl.client import ApiError, JsonClient

EXIT_FAILED = 1
EXIT_USAGE = 2
#: The gateway writes it into the audit log as the one who acted.
ACTOR_HEADER = "x-loom-actor"

Command = Callable[[argparse.Namespace], int]


class UsageError(Exception):
    """Bad arguments that argparse cannot see (a malformed ``name=value``, an unreadable file)."""


def client(args: argparse.Namespace, name: str) -> JsonClient:
    """The client of ``--gateway`` or ``--monitor``; gateway calls carry ``--actor``."""
    url = getattr(args, name)
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise UsageError(f"--{name} must be an http:// or https:// URL, got {url!r}")
    actor = getattr(args, "actor", "")
    headers = {ACTOR_HEADER: actor} if name == "gateway" and actor else None
    return JsonClient(name, url, args.timeout, headers)


def as_dict(body: Any, what: str) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise ApiError(f"unexpected answer for {what}: expected a JSON object")
    return body


def out(lines: list[str]) -> None:
    print("\n".join(lines))


def pair(item: str, what: str) -> tuple[str, str]:
    name, sep, value = item.partition("=")
    if not sep or not name:
        raise UsageError(f"{what}: expected name=value, got {item!r}")
    return name, value


def quote(segment: str) -> str:
    """One path segment, escaped (a model or pipeline name from the command line)."""
    return urllib.parse.quote(segment, safe="")
