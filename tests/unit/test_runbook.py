"""deploy/README.md's runbook covers every alert, and the loomctl commands it tells operators to run exist.

Alerts come from the Prometheus rules (deploy/monitoring/rules/loom-alerts.yml and any PrometheusRule under
deploy/) and from the monitor's built-in rules (every ``condition(NAME, ...)`` in services/monitor). Each needs a
``### <AlertName>`` heading. Every ``loomctl ...`` in a code span or block must name a real command, subcommand and
options of loomctl's own parser.
"""

from __future__ import annotations

import argparse
import ast
import re
import shlex
from pathlib import Path

import pytest
import yaml

from tools.loomctl.__main__ import build_parser

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "deploy" / "README.md"
RULES = ROOT / "deploy" / "monitoring" / "rules" / "loom-alerts.yml"
MONITOR = ROOT / "services" / "monitor"
#: Options of loomctl itself, which may come before the command.
_GLOBAL_WITH_VALUE = ("--gateway", "--monitor", "--timeout")


def prometheus_alerts(deploy: Path = ROOT / "deploy") -> set[str]:
    """Alert names of loom-alerts.yml and of every PrometheusRule object under ``deploy``."""
    names = {r["alert"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"] if "alert" in r}
    for path in [*deploy.rglob("*.yaml"), *deploy.rglob("*.yml")]:
        try:
            docs = list(yaml.safe_load_all(path.read_text()))
        except yaml.YAMLError:
            continue  # templates and the like: not Kubernetes objects
        for doc in docs:
            if isinstance(doc, dict) and doc.get("kind") == "PrometheusRule":
                for group in doc.get("spec", {}).get("groups", []):
                    names |= {r["alert"] for r in group.get("rules", []) if "alert" in r}
    return names


def monitor_alerts(folder: Path = MONITOR) -> set[str]:
    """The first argument of every ``condition(...)`` call in the monitor: a literal or a module constant."""
    names: set[str] = set()
    for path in folder.glob("*.py"):
        tree = ast.parse(path.read_text())
        constants = {
            t.id: node.value.value
            for node in tree.body
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant)
            for t in node.targets
            if isinstance(t, ast.Name) and isinstance(node.value.value, str)
        }
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "condition" and node.args:
                first = node.args[0]
                if isinstance(first, ast.Constant) and isinstance(first.value, str):
                    names.add(first.value)
                elif isinstance(first, ast.Name) and first.id in constants:
                    names.add(constants[first.id])
    return names


def missing_headings(markdown: str, alerts: set[str]) -> list[str]:
    headings = set(re.findall(r"^### +`?([A-Za-z0-9_]+)`?\s*$", markdown, flags=re.MULTILINE))
    return sorted(alerts - headings)


def loomctl_mentions(markdown: str) -> list[str]:
    """``loomctl ...`` as written in fenced blocks and inline code (prose may say "loomctl" freely)."""
    code = re.findall(r"^```[^\n]*\n(.*?)^```", markdown, flags=re.MULTILINE | re.DOTALL)
    code += re.findall(r"`([^`\n]+)`", re.sub(r"^```.*?^```", "", markdown, flags=re.MULTILINE | re.DOTALL))
    found = []
    for chunk in code:
        for line in chunk.splitlines():
            line = line.split(" #", 1)[0]  # a comment after the command
            for m in re.finditer(r"(?:^|[\s/])loomctl((?:\s+[^\s|;&]+)*)", line):
                found.append("loomctl" + m.group(1))
    return found


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def bad_loomctl(markdown: str, parser: argparse.ArgumentParser) -> list[str]:
    """Mentions whose command, subcommand or ``--option`` loomctl does not have."""
    bad = []
    for mention in loomctl_mentions(markdown):
        try:
            tokens = shlex.split(mention)[1:]
        except ValueError:
            tokens = mention.split()[1:]
        while tokens and tokens[0].startswith("--"):  # loomctl --monitor URL alerts
            tokens = tokens[2:] if tokens[0] in _GLOBAL_WITH_VALUE and "=" not in tokens[0] else tokens[1:]
        if not tokens:
            continue  # "`loomctl`" on its own
        current = parser
        path: list[str] = []
        for token in tokens:
            subs = _subparsers(current)
            if not subs or token.startswith("-") or token.startswith("<") or token.startswith("["):
                break
            alternatives = token.split("|")  # "rollout status|pause minilm"
            if not all(a in subs for a in alternatives):
                bad.append(f"{mention!r}: no command {' '.join([*path, token])!r}")
                break
            current, path = subs[alternatives[0]], [*path, alternatives[0]]
        options = set(current._option_string_actions) | set(parser._option_string_actions)
        for token in tokens:
            flag = token.strip("[]").split("=", 1)[0]
            if flag.startswith("--") and flag not in options:
                bad.append(f"{mention!r}: {' '.join(path) or 'loomctl'} has no option {flag}")
    return bad


def all_alerts() -> set[str]:
    return prometheus_alerts() | monitor_alerts()


def test_the_alert_sources_are_found() -> None:
    # Were a source lost (a moved file, a renamed helper), the runbook check would pass vacuously.
    assert {"LoomModelUnavailable", "LoomBreakerOpen", "LoomDeadLetters"} <= prometheus_alerts()
    assert {"LoomModelUnavailable", "LoomMonitorDropping", "LoomRolloutRolledBack"} <= monitor_alerts()


def test_every_alert_has_a_runbook_entry() -> None:
    missing = missing_headings(README.read_text(), all_alerts())
    assert not missing, f"deploy/README.md lacks a '### <AlertName>' runbook entry for {missing}"


def test_every_loomctl_command_in_the_runbook_exists() -> None:
    text = README.read_text()
    assert loomctl_mentions(text), "deploy/README.md mentions no loomctl command"
    assert not bad_loomctl(text, build_parser({}))


def test_a_copy_without_a_heading_fails(tmp_path: Path) -> None:
    alerts = all_alerts()
    good = "\n".join(f"### {a}\n\nWhat it means.\n" for a in sorted(alerts))
    assert missing_headings(good, alerts) == []
    copy = tmp_path / "README.md"
    copy.write_text(good.replace("### LoomDeadLetters\n", "### Dead letters\n"))
    assert missing_headings(copy.read_text(), alerts) == ["LoomDeadLetters"]


def test_a_new_monitor_rule_needs_an_entry(tmp_path: Path) -> None:
    rules = tmp_path / "rules.py"
    rules.write_text(
        'X = "LoomQueueStuck"\n\ndef f():\n    return [condition(X, "P2"), condition("LoomOther", "P1")]\n'
    )
    assert monitor_alerts(tmp_path) == {"LoomQueueStuck", "LoomOther"}


def test_invented_commands_and_options_fail() -> None:
    parser = build_parser({})
    good = (
        "```\nloomctl dlq list --stage infer_minilm\nloomctl rollout status|pause minilm\n```\n"
        "Run `loomctl rollback minilm --reason x` or `.venv/bin/loomctl --monitor http://m:8090 alerts --all`."
    )
    assert bad_loomctl(good, parser) == []
    assert len(loomctl_mentions(good)) == 4
    broken = good.replace("dlq list", "dlq purge").replace("--reason", "--why")
    found = bad_loomctl(broken, parser)
    assert any("'dlq purge'" in b for b in found) and any("--why" in b for b in found), found
    assert bad_loomctl("`loomctl scale inference 3`", parser)
