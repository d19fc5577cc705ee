"""Where fired and resolved alerts go: NATS, an Alertmanager-compatible webhook, metrics."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging

import aiohttp
from prometheus_client import Counter, Gauge

from services.common import subjects
from services.common.bus import Bus
from services.common.pb.loom.v1 import monitor_pb2
from services.monitor.alerts import Alert

log = logging.getLogger(__name__)

ACTIVE = Gauge("loom_alerts_active", "Alerts firing now.", ["alertname", "severity"])
TRANSITIONS = Counter(
    "loom_alert_transitions_total", "Alerts that fired or resolved.", ["alertname", "severity", "state"]
)


def to_proto(alert: Alert) -> monitor_pb2.Alert:
    return monitor_pb2.Alert(
        id=alert.id,
        name=alert.name,
        severity=alert.severity,
        state=alert.state,
        labels=alert.labels,
        summary=alert.summary,
        value=alert.value,
        started_unix_ms=alert.started_unix_ms,
        resolved_unix_ms=alert.resolved_unix_ms or 0,
    )


def _iso(ms: int | None) -> str:
    if ms is None:
        return "0001-01-01T00:00:00Z"
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def alertmanager_alert(alert: Alert, generator_url: str) -> dict[str, object]:
    """One alert as Alertmanager's API and webhooks spell it."""
    return {
        "status": alert.state,
        "labels": {"alertname": alert.name, "severity": alert.severity, **alert.labels},
        "annotations": {"summary": alert.summary, "value": f"{alert.value:.6g}"},
        "startsAt": _iso(alert.started_unix_ms),
        "endsAt": _iso(alert.resolved_unix_ms),
        "generatorURL": generator_url,
        "fingerprint": alert.id,
    }


def webhook_body(alerts: list[Alert], url: str, generator_url: str) -> object:
    """A URL ending in /api/v2/alerts is an Alertmanager itself (a list of alerts);
    anything else receives Alertmanager's webhook message (version 4)."""
    items = [alertmanager_alert(a, generator_url) for a in alerts]
    if url.rstrip("/").endswith("/api/v2/alerts"):
        for item in items:
            item.pop("status")
            item.pop("fingerprint")
        return items
    firing = any(a.state == "firing" for a in alerts)
    return {
        "version": "4",
        "status": "firing" if firing else "resolved",
        "receiver": "loom",
        "groupKey": "loom",
        "truncatedAlerts": 0,
        "groupLabels": {},
        "commonLabels": {},
        "commonAnnotations": {},
        "externalURL": generator_url,
        "alerts": items,
    }


class Notifier:
    """Sends alert transitions; a failing sink is logged and never stops the monitor.

    Webhook POSTs run in the background (a slow receiver never holds up an evaluation), at most
    ``max_pending`` at once; each takes ``timeout_s`` at most.
    """

    def __init__(
        self,
        bus: Bus,
        session: aiohttp.ClientSession,
        webhook_url: str = "",
        generator_url: str = "",
        timeout_s: float = 5.0,
        max_pending: int = 16,
    ) -> None:
        self.bus = bus
        self.session = session
        self.webhook_url = webhook_url
        self.generator_url = generator_url
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._tasks: set[asyncio.Task[None]] = set()
        #: POSTs in flight at most; past it a batch of transitions is not POSTed, and counted here
        #: (loom_monitor_dropped_total{buffer="webhook"}). NATS still carries every transition.
        self.max_pending = max_pending
        self.dropped = 0

    async def send(self, changed: list[Alert], firing: list[Alert]) -> None:
        ACTIVE.clear()
        for alert in firing:
            ACTIVE.labels(alert.name, alert.severity).inc()
        for alert in changed:
            TRANSITIONS.labels(alert.name, alert.severity, alert.state).inc()
            log.warning("alert %s %s: %s", alert.state, alert.id, alert.summary)
            try:
                await self.bus.publish(subjects.alert(alert.severity), to_proto(alert).SerializeToString())
            except Exception as exc:
                log.warning("could not publish alert %s: %s", alert.id, exc)
        if changed and self.webhook_url:
            if len(self._tasks) >= self.max_pending:
                self.dropped += 1
                log.warning("alert webhook %s: %d POSTs in flight, dropped one", self.webhook_url, len(self._tasks))
                return
            # The body now: alerts are live objects, and a firing one may resolve before the POST runs.
            body = webhook_body(changed, self.webhook_url, self.generator_url)
            task = asyncio.create_task(self._post(body))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _post(self, body: object) -> None:
        try:
            async with self.session.post(self.webhook_url, json=body, timeout=self.timeout) as resp:
                if resp.status >= 300:
                    log.warning("alert webhook %s answered %d", self.webhook_url, resp.status)
        except Exception as exc:
            log.warning("alert webhook %s failed: %s", self.webhook_url, exc)
