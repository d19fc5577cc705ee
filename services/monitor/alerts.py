"""Alert state: which alerts fire, when they started and resolved.

Rules (``services.monitor.rules``) turn the monitor's signals into
:class:`Condition` instances on every evaluation; this book keeps the state
machine (pending -> firing -> resolved) and returns the transitions for the
notifier. A condition that is no longer reported counts as resolved.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Literal

Severity = Literal["P1", "P2", "warning"]
SEVERITIES: tuple[Severity, ...] = ("P1", "P2", "warning")


@dataclass(frozen=True)
class Condition:
    """One rule instance as evaluated now."""

    name: str
    severity: Severity
    labels: tuple[tuple[str, str], ...]
    active: bool
    value: float
    summary: str
    #: How long the condition must hold before the alert fires.
    for_s: float = 0.0

    @property
    def id(self) -> str:
        return self.name + "{" + ",".join(f"{k}={v}" for k, v in self.labels) + "}"


def condition(
    name: str, severity: Severity, labels: dict[str, str], active: bool, value: float, summary: str, for_s: float = 0.0
) -> Condition:
    return Condition(name, severity, tuple(sorted(labels.items())), active, float(value), summary, for_s)


@dataclass
class Alert:
    id: str
    name: str
    severity: Severity
    labels: dict[str, str]
    summary: str
    value: float
    started_unix_ms: int
    state: Literal["firing", "resolved"] = "firing"
    resolved_unix_ms: int | None = None

    def to_dict(self) -> dict[str, object]:
        return {
            "id": self.id,
            "name": self.name,
            "severity": self.severity,
            "state": self.state,
            "labels": dict(self.labels),
            "summary": self.summary,
            "value": round(self.value, 6),
            "started_unix_ms": self.started_unix_ms,
            "resolved_unix_ms": self.resolved_unix_ms,
        }


@dataclass
class AlertBook:
    """Active alerts, pending conditions and a bounded history of resolved ones."""

    history: int = 500
    active: dict[str, Alert] = field(default_factory=dict)
    pending: dict[str, int] = field(default_factory=dict)
    resolved: deque[Alert] = field(default_factory=deque)
    #: Resolved alerts pushed out of the history by newer ones (loom_monitor_evicted_total{buffer="alerts"}).
    evicted: int = 0

    def evaluate(self, conditions: list[Condition], now_ms: int) -> list[Alert]:
        """Apply one evaluation; returns the alerts that fired or resolved just now."""
        changed: list[Alert] = []
        seen: set[str] = set()
        for c in conditions:
            if not c.active:
                continue
            seen.add(c.id)
            alert = self.active.get(c.id)
            if alert is not None and alert.severity != c.severity:
                # A change of severity (an accuracy drop past 10 points) is a new alert, as in Alertmanager,
                # whose identity includes the severity label: the old one resolves, the new one fires now.
                self._resolve(c.id, now_ms, changed)
                alert = None
                self.pending[c.id] = now_ms - int(c.for_s * 1000)  # it has held already
            if alert is not None:  # still firing: keep its start, refresh what it says
                alert.value, alert.summary = c.value, c.summary
                continue
            since = self.pending.setdefault(c.id, now_ms)
            if now_ms - since >= c.for_s * 1000:
                self.pending.pop(c.id, None)
                alert = Alert(c.id, c.name, c.severity, dict(c.labels), c.summary, c.value, now_ms)
                self.active[c.id] = alert
                changed.append(alert)
        for key in [k for k in self.pending if k not in seen]:
            del self.pending[key]
        for key in [k for k in self.active if k not in seen]:
            self._resolve(key, now_ms, changed)
        return changed

    def _resolve(self, key: str, now_ms: int, changed: list[Alert]) -> None:
        alert = self.active.pop(key)
        alert.state, alert.resolved_unix_ms = "resolved", now_ms
        self.resolved.append(alert)
        while len(self.resolved) > self.history:
            self.resolved.popleft()
            self.evicted += 1
        changed.append(alert)

    def firing(self) -> list[Alert]:
        order = {s: i for i, s in enumerate(SEVERITIES)}
        return sorted(self.active.values(), key=lambda a: (order[a.severity], a.started_unix_ms))

    def all(self) -> list[Alert]:
        return [*self.firing(), *reversed(self.resolved)]
