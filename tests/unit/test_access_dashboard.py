"""The dashboard page with credentials: the key prompt, a key in the URL fragment, refused keys.

Headless Chromium against a fake monitor (the fixture document of
tests/dashboard_fixture.py) that wants ``Authorization: Bearer`` with a viewer
key, as the real monitor does.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiohttp import web

from tests.browser import Chromium
from tests.dashboard_fixture import build_dashboard
from tests.loopback import serve_http

pytestmark = pytest.mark.unit

STATIC = Path(__file__).resolve().parents[2] / "services" / "monitor" / "static"
VIEWER, PREDICT = "loom_viewer-key-0123456789abcdef", "loom_predict-key-0123456789abcdef"


@dataclass
class Monitor:
    url: str = ""
    #: The Authorization header of every API call, in order ("" when none came).
    calls: list[str] = field(default_factory=list)


def make_app(monitor: Monitor) -> web.Application:
    async def index(_: web.Request) -> web.FileResponse:
        return web.FileResponse(STATIC / "index.html")

    async def dashboard(request: web.Request) -> web.Response:
        sent = request.headers.get("Authorization", "")
        monitor.calls.append(sent)
        if sent == f"Bearer {VIEWER}":
            return web.json_response(build_dashboard())
        if sent == f"Bearer {PREDICT}":
            message = "'ci' (roles: predict) may not call GET /v1/dashboard: it needs the role admin or viewer"
            return web.json_response({"error": {"code": "PERMISSION_DENIED", "message": message}}, status=403)
        body = {"error": {"code": "UNAUTHENTICATED", "message": "credentials required" if not sent else "unknown key"}}
        return web.json_response(body, status=401, headers={"WWW-Authenticate": 'Bearer realm="loom"'})

    app = web.Application()
    app.router.add_get("/", index)
    app.router.add_get("/v1/dashboard", dashboard)
    app.router.add_static("/static/", STATIC)
    return app


@pytest.fixture
async def monitor() -> AsyncIterator[Monitor]:
    fake = Monitor()
    async with serve_http(make_app(fake)) as port:
        fake.url = f"http://127.0.0.1:{port}/"
        yield fake


async def enter_key(browser: Chromium, key: str) -> None:
    await browser.wait_for("document.getElementById('key-form') !== null", timeout=10)
    await browser.evaluate(
        f"document.getElementById('api-key').value = {key!r}; document.getElementById('key-form').requestSubmit()"
    )


def refusals(browser: Chromium) -> list[str]:
    """Console errors other than Chromium's note on each refused (401/403) fetch."""
    return [e for e in browser.console_errors() if "status of 401" not in e and "status of 403" not in e]


async def test_the_page_asks_for_a_key_then_sends_it_with_every_call(monitor: Monitor) -> None:
    async with Chromium() as browser:
        await browser.navigate(monitor.url)
        await browser.wait_for("document.getElementById('key-form') !== null", timeout=10)
        assert await browser.evaluate("document.getElementById('live').dataset.state") == "auth"
        banner = await browser.evaluate("document.getElementById('api-error').textContent")
        assert "needs an API key or a JWT with the role viewer" in banner
        asked = len(monitor.calls)
        await browser.evaluate("new Promise(r => setTimeout(r, 2500))")
        assert len(monitor.calls) == asked == 1  # no polling while it waits for a key

        await enter_key(browser, "loom_not-a-key")
        await browser.wait_for("document.getElementById('api-error').textContent.includes('The key was refused')")
        await enter_key(browser, PREDICT)
        await browser.wait_for("document.getElementById('api-error').textContent.includes('needs the role viewer')")
        assert await browser.evaluate("sessionStorage.getItem('loom.monitor.key')") is None  # refused: forgotten

        await enter_key(browser, VIEWER)
        await browser.wait_for("document.body.dataset.ready === '1'", timeout=10)
        assert await browser.evaluate("document.getElementById('api-error').hidden") is True
        assert await browser.evaluate("document.querySelectorAll('[data-panel=pipelines] [data-pipeline]').length") == 2
        await browser.evaluate("new Promise(r => setTimeout(r, 2300))")  # one more poll
        assert monitor.calls[:3] == ["", "Bearer loom_not-a-key", f"Bearer {PREDICT}"]
        assert len(monitor.calls) >= 5 and set(monitor.calls[3:]) == {f"Bearer {VIEWER}"}
        assert refusals(browser) == []


async def test_a_key_in_the_fragment_signs_in_and_leaves_the_address_bar(monitor: Monitor) -> None:
    async with Chromium() as browser:
        await browser.navigate(f"{monitor.url}#key={VIEWER}")
        await browser.wait_for("document.body.dataset.ready === '1'", timeout=10)
        assert await browser.evaluate("window.location.href") == monitor.url
        assert await browser.evaluate("sessionStorage.getItem('loom.monitor.key')") == VIEWER
        assert monitor.calls and set(monitor.calls) == {f"Bearer {VIEWER}"}  # never a call without it
        # Another load in the same tab keeps the key; other fragments (the panel links) stay.
        await browser.navigate(f"{monitor.url}?again#alerts")
        await browser.wait_for("document.body.dataset.ready === '1'", timeout=10)
        assert await browser.evaluate("window.location.hash") == "#alerts"
        assert set(monitor.calls) == {f"Bearer {VIEWER}"}
        assert browser.console_errors() == []
