"""A small JSON-over-HTTP client (urllib) that turns every failure into one readable sentence."""

from __future__ import annotations

import json
import socket
import ssl
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

#: What to do about a refused credential, after the server's own message.
AUTH_HINTS = {
    401: (
        "\n  The call needs credentials: set LOOM_API_KEY to an API key or a JWT"
        " (make run keeps a local admin key in .loom/dev-api-key, which loomctl reads when LOOM_API_KEY is unset)."
    ),
    403: "\n  The credential is valid but its roles do not allow this call: use a key with the role named above.",
}


class ApiError(Exception):
    """A call that failed. ``status`` is the HTTP status, or None when no answer came back."""

    def __init__(self, message: str, *, status: int | None = None, code: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code


@dataclass(frozen=True)
class Reply:
    status: int
    body: Any


def _reason(exc: BaseException, timeout: float) -> str:
    """Why a connection failed, in words (urllib wraps the socket error in ``URLError.reason``)."""
    if isinstance(exc, urllib.error.URLError) and isinstance(exc.reason, BaseException):
        return _reason(exc.reason, timeout)
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, TimeoutError | socket.timeout):
        return f"no answer within {timeout:g} s"
    if isinstance(exc, socket.gaierror):
        return f"unknown host ({exc.strerror})"
    if isinstance(exc, urllib.error.URLError):
        return str(exc.reason)
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return str(exc) or type(exc).__name__


def _error_text(body: Any, raw: bytes) -> tuple[str, str]:
    """(code, message) from an error body: Loom's ``{"error": {"code", "message"}}``, KServe's ``{"error": "..."}``."""
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict):
            return str(err.get("code", "")), str(err.get("message", ""))
        if isinstance(err, str):
            return "", err
    text = raw.decode("utf-8", "replace").strip()
    return "", text[:200]


class JsonClient:
    """GET and POST JSON against one service. ``name`` ("monitor", "gateway") goes into the messages."""

    def __init__(
        self,
        name: str,
        base_url: str,
        timeout: float,
        headers: Mapping[str, str] | None = None,
        *,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.name = name
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        #: Sent with every call (e.g. ``Authorization``).
        self.headers = dict(headers or {})
        #: Verifies an https:// server (None: the system's roots).
        self.ssl_context = ssl_context

    def url(self, path: str, query: Mapping[str, str | int] | None = None) -> str:
        url = self.base_url + path
        if query:
            url += "?" + urllib.parse.urlencode(query)
        return url

    def fetch(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        query: Mapping[str, str | int] | None = None,
        timeout: float | None = None,
        check: bool = True,
        headers: Mapping[str, str] | None = None,
    ) -> Reply:
        """One call. :class:`ApiError` if no answer came, or (``check``) if the answer is an HTTP error."""
        limit = self.timeout if timeout is None else timeout
        data = None if body is None else json.dumps(body).encode()
        headers = {"Accept": "application/json", **self.headers, **(headers or {})}
        if data is not None:
            headers["Content-Type"] = "application/json"
        req = urllib.request.Request(self.url(path, query), data=data, headers=headers, method=method)
        try:
            with urllib.request.urlopen(req, timeout=limit, context=self.ssl_context) as resp:
                status, raw = resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            status, raw = exc.code, exc.read()
        except (urllib.error.URLError, OSError) as exc:
            raise ApiError(f"cannot reach the {self.name} at {self.base_url}: {_reason(exc, limit)}") from None
        try:
            parsed = json.loads(raw) if raw.strip() else None
        except ValueError:
            if status < 400:
                raise ApiError(f"the {self.name} answered {method} {path} with a body that is not JSON") from None
            parsed = None
        if check and status >= 400:
            code, message = _error_text(parsed, raw)
            label = f"HTTP {status} {code}".rstrip()
            text = f"the {self.name} answered {label}: {message or 'no details'}{AUTH_HINTS.get(status, '')}"
            raise ApiError(text, status=status, code=code)
        return Reply(status, parsed)

    def get(self, path: str, *, query: Mapping[str, str | int] | None = None, timeout: float | None = None) -> Any:
        return self.fetch("GET", path, query=query, timeout=timeout).body

    def post(
        self, path: str, body: Any, *, timeout: float | None = None, headers: Mapping[str, str] | None = None
    ) -> Any:
        return self.fetch("POST", path, body, timeout=timeout, headers=headers).body

    def put(self, path: str, body: Any) -> Any:
        return self.fetch("PUT", path, body).body

    def delete(self, path: str) -> Any:
        return self.fetch("DELETE", path).body
