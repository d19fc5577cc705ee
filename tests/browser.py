"""A small Chrome DevTools Protocol driver for page tests.

``async with Chromium() as browser:`` starts the Debian ``chromium`` headless on
a free DevTools port, attaches to its one page over a websocket (aiohttp) and
offers navigate / evaluate / wait_for / click / screenshot. Only the process it
started is stopped on exit, and its profile directory is removed.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import aiohttp

CALL_TIMEOUT_S = 30.0
START_TIMEOUT_S = 30.0


class BrowserError(RuntimeError):
    """Chromium is missing, did not start, or a DevTools call failed."""


def find_chromium() -> str:
    """Path of the chromium binary, or a BrowserError that says how to get one."""
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        raise BrowserError(
            "chromium is not installed (looked for `chromium` and `chromium-browser` on PATH); "
            "`make test` installs it, or run `apt-get install chromium`"
        )
    return path


class Chromium:
    """Headless Chromium driven over the DevTools protocol."""

    def __init__(self, width: int = 1440, height: int = 2200) -> None:
        self.width, self.height = width, height
        self._proc: subprocess.Popen[bytes] | None = None
        self._profile: Path | None = None
        self._session: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._reader: asyncio.Task[None] | None = None
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._waiters: list[tuple[str, asyncio.Future[dict[str, Any]]]] = []
        self._errors: list[str] = []

    async def __aenter__(self) -> Chromium:
        binary = find_chromium()
        self._profile = Path(tempfile.mkdtemp(prefix="loom-chromium-"))
        try:
            await self._start(binary)
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def _start(self, binary: str) -> None:
        assert self._profile is not None
        log = (self._profile / "chromium.log").open("wb")
        args = [
            binary,
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-extensions",
            "--remote-debugging-port=0",
            f"--user-data-dir={self._profile}",
            f"--window-size={self.width},{self.height}",
            "about:blank",
        ]
        # Its own session, so a Ctrl-C to pytest does not race our shutdown of it.
        self._proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        port = await self._devtools_port()
        self._session = aiohttp.ClientSession()
        async with self._session.get(f"http://127.0.0.1:{port}/json/list") as resp:
            targets = await resp.json()
        pages = [t for t in targets if t.get("type") == "page"]
        if not pages:
            raise BrowserError(f"chromium has no page target: {targets}")
        # Screenshots of tall pages are large base64 strings: no message size limit.
        self._ws = await self._session.ws_connect(pages[0]["webSocketDebuggerUrl"], max_msg_size=0)
        self._reader = asyncio.create_task(self._read())
        for domain in ("Page", "Runtime", "Log"):
            await self.send(f"{domain}.enable")

    async def _devtools_port(self) -> int:
        assert self._proc is not None and self._profile is not None
        marker = self._profile / "DevToolsActivePort"
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise BrowserError(f"chromium exited with {self._proc.returncode}: {self._log_tail()}")
            with contextlib.suppress(FileNotFoundError, ValueError, IndexError):
                return int(marker.read_text().splitlines()[0])
            await asyncio.sleep(0.05)
        raise BrowserError(f"chromium wrote no DevToolsActivePort in {START_TIMEOUT_S:.0f} s: {self._log_tail()}")

    def _log_tail(self) -> str:
        assert self._profile is not None
        try:
            return (self._profile / "chromium.log").read_text(errors="replace")[-2000:]
        except OSError:
            return "(no log)"

    async def _read(self) -> None:
        assert self._ws is not None
        async for msg in self._ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                continue
            data = json.loads(msg.data)
            if "id" in data:
                fut = self._pending.pop(data["id"], None)
                if fut is not None and not fut.done():
                    fut.set_result(data)
            else:
                self._on_event(data.get("method", ""), data.get("params", {}))
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(BrowserError("DevTools connection closed"))

    def _on_event(self, method: str, params: dict[str, Any]) -> None:
        if method == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails", {})
            text = details.get("exception", {}).get("description") or details.get("text", "exception")
            self._errors.append(f"exception: {text}")
        elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            parts = [str(a.get("value", a.get("description", ""))) for a in params.get("args", [])]
            self._errors.append("console.error: " + " ".join(parts))
        elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
            entry = params["entry"]
            self._errors.append(f"log: {entry.get('text', '')} {entry.get('url', '')}".strip())
        for waiter in [w for w in self._waiters if w[0] == method]:
            self._waiters.remove(waiter)
            if not waiter[1].done():
                waiter[1].set_result(params)

    async def send(self, method: str, params: dict[str, Any] | None = None, timeout: float = CALL_TIMEOUT_S) -> Any:
        """One DevTools command; returns its ``result`` or raises BrowserError."""
        if self._ws is None:
            raise BrowserError("not connected")
        call_id = next(self._ids)
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[call_id] = fut
        await self._ws.send_str(json.dumps({"id": call_id, "method": method, "params": params or {}}))
        try:
            reply = await asyncio.wait_for(fut, timeout)
        finally:
            self._pending.pop(call_id, None)
        if "error" in reply:
            raise BrowserError(f"{method}: {reply['error'].get('message')}")
        return reply.get("result", {})

    def _expect(self, method: str) -> asyncio.Future[dict[str, Any]]:
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiters.append((method, fut))
        return fut

    async def navigate(self, url: str, timeout: float = CALL_TIMEOUT_S) -> None:
        """Open ``url`` and wait for its load event."""
        loaded = self._expect("Page.loadEventFired")
        result = await self.send("Page.navigate", {"url": url})
        if result.get("errorText"):
            raise BrowserError(f"navigating to {url}: {result['errorText']}")
        await asyncio.wait_for(loaded, timeout)

    async def evaluate(self, js: str) -> Any:
        """Value of a JavaScript expression (promises awaited), or BrowserError if it threw."""
        result = await self.send(
            "Runtime.evaluate", {"expression": js, "returnByValue": True, "awaitPromise": True, "userGesture": True}
        )
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            text = details.get("exception", {}).get("description") or details.get("text")
            raise BrowserError(f"evaluating {js[:80]!r}: {text}")
        return result.get("result", {}).get("value")

    async def wait_for(self, js_predicate: str, timeout: float = 10.0, interval: float = 0.1) -> Any:
        """Poll until ``js_predicate`` is truthy and return its value; TimeoutError after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while True:
            value = await self.evaluate(js_predicate)
            if value:
                return value
            if time.monotonic() >= deadline:
                raise TimeoutError(f"still false after {timeout} s: {js_predicate}")
            await asyncio.sleep(interval)

    async def click(self, selector: str) -> None:
        """A real mouse click in the middle of the first element matching ``selector``."""
        box = await self.evaluate(
            f"""(() => {{
                const el = document.querySelector({json.dumps(selector)});
                if (!el) return null;
                el.scrollIntoView({{block: "center"}});
                const r = el.getBoundingClientRect();
                return {{x: r.left + r.width / 2, y: r.top + r.height / 2}};
            }})()"""
        )
        if box is None:
            raise BrowserError(f"nothing matches {selector!r}")
        for kind in ("mousePressed", "mouseReleased"):
            await self.send(
                "Input.dispatchMouseEvent",
                {"type": kind, "x": box["x"], "y": box["y"], "button": "left", "clickCount": 1},
            )

    async def screenshot(self, path: str | os.PathLike[str]) -> Path:
        """Save a PNG of the whole page (beyond the viewport) to ``path``."""
        metrics = await self.send("Page.getLayoutMetrics")
        size = metrics.get("cssContentSize") or metrics["contentSize"]
        clip = {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}
        shot = await self.send(
            "Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True, "clip": clip}, timeout=60
        )
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(base64.b64decode(shot["data"]))
        return out

    def console_errors(self) -> list[str]:
        """Uncaught exceptions, console.error calls and error log entries seen so far."""
        return list(self._errors)

    async def close(self) -> None:
        """Disconnect, stop the Chromium this object started and remove its profile."""
        if self._ws is not None:
            await self._ws.close()
        if self._reader is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(self._reader, 2)
        if self._session is not None:
            await self._session.close()
        self._ws = self._reader = self._session = None
        if self._proc is not None:
            await asyncio.to_thread(_stop, self._proc)
            self._proc = None
        if self._profile is not None:
            shutil.rmtree(self._profile, ignore_errors=True)
            self._profile = None


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM by PID, then SIGKILL; leftovers of its own process group (renderers) go last."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    # The group was created for this process (start_new_session), so it holds only its children.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
