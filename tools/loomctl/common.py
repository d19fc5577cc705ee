"""What every loomctl command shares: exit codes, the usage error, clients and small output helpers."""

from __future__ import annotations

import argparse
import os
import ssl
import urllib.parse
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from tools.loomctl.client import ApiError, JsonClient

EXIT_FAILED = 1
EXIT_USAGE = 2
ROOT = Path(__file__).resolve().parents[2]
#: Where ``make run`` keeps its local admin key, relative to the project root (or the current folder).
DEV_KEY_FILE = Path(".loom") / "dev-api-key"

Command = Callable[[argparse.Namespace], int]


class UsageError(Exception):
    """Bad arguments that argparse cannot see (a malformed ``name=value``, an unreadable file)."""


def api_key(env: Mapping[str, str], cwd: Path | None = None) -> str:
    """The gateway credential (an API key or a JWT): LOOM_API_KEY, else LOOM_DEV_API_KEY, else make run's file."""
    for name in ("LOOM_API_KEY", "LOOM_DEV_API_KEY"):
        if env.get(name, "").strip():
            return env[name].strip()
    for folder in (Path.cwd() if cwd is None else cwd, ROOT):
        try:
            return (folder / DEV_KEY_FILE).read_text().strip()
        except OSError:
            continue
    return ""


def tls_context(env: Mapping[str, str]) -> ssl.SSLContext | None:
    """How https:// servers are verified: against LOOM_TLS_CA when set, else the system's roots (None)."""
    ca = env.get("LOOM_TLS_CA", "").strip()
    if not ca:
        return None
    try:
        return ssl.create_default_context(cafile=ca)
    except (OSError, ssl.SSLError) as exc:
        raise UsageError(f"LOOM_TLS_CA={ca}: cannot load the CA bundle: {exc}") from None


def client(args: argparse.Namespace, name: str) -> JsonClient:
    """The client of ``--gateway`` or ``--monitor``; every call carries the credential of :func:`api_key`."""
    url = getattr(args, name)
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise UsageError(f"--{name} must be an http:// or https:// URL, got {url!r}")
    env = getattr(args, "environ", os.environ)
    key = api_key(env)
    headers = {"Authorization": f"Bearer {key}"} if key else None
    return JsonClient(name, url, args.timeout, headers, ssl_context=tls_context(env))


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
