"""deploy/compose: the Compose file against the compose-spec schema (offline), and what a schema cannot see.

The schema is the one check-jsonschema ships (vendor.compose-spec, compose-spec's own JSON schema);
nothing is downloaded. Every semantic check also runs on a broken copy and must fail there.
"""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import AliasChoices
from pydantic_settings import BaseSettings

from services.common import healthcheck
from services.common.settings import CommonSettings
from services.fusion.settings import FusionSettings
from services.gateway.settings import GatewaySettings
from services.inference.settings import InferenceSettings
from services.monitor.settings import MonitorSettings
from services.postprocess.settings import PostprocessSettings
from services.preprocess.settings import PreprocessSettings

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]
COMPOSE_DIR = ROOT / "deploy" / "compose"
COMPOSE = COMPOSE_DIR / "compose.yaml"
SETTINGS: dict[str, type[BaseSettings]] = {
    "services.gateway": GatewaySettings,
    "services.preprocess": PreprocessSettings,
    "services.inference": InferenceSettings,
    "services.postprocess": PostprocessSettings,
    "services.fusion": FusionSettings,
    "services.monitor": MonitorSettings,
    "services.common.provision": CommonSettings,
}
SIX = ("gateway", "preprocess", "inference", "postprocess", "fusion", "monitor")
PUBLISHERS = {"gateway", "grafana", "prometheus", "jaeger"}  # the only services with host ports
Doc = dict[str, Any]


def env_names(cls: type[BaseSettings]) -> set[str]:
    """The environment variables a settings class reads (aliases, else prefix + field name)."""
    prefix = str(cls.model_config.get("env_prefix", ""))
    names = set()
    for name, field in cls.model_fields.items():
        alias = field.validation_alias
        if isinstance(alias, AliasChoices):
            names |= {c for c in alias.choices if isinstance(c, str)}
        elif isinstance(alias, str):
            names.add(alias)
        else:
            names.add((prefix + name).upper())
    return names


def module_of(service: Doc) -> str:
    cmd = service.get("command") or []
    return cmd[2] if len(cmd) >= 3 and cmd[:2] == ["python", "-m"] else ""


def flags(cmd: list[str]) -> dict[str, str]:
    return dict(part.removeprefix("--").split("=", 1) for part in cmd if part.startswith("--") and "=" in part)


def required_vars(text: str) -> set[str]:
    return set(re.findall(r"\$\{(\w+):\?", text))


# --- the semantic checks: each returns what is wrong ----------------------------------------------


def image_problems(doc: Doc) -> list[str]:
    out = []
    for name, svc in doc["services"].items():
        image = svc.get("image", "")
        ref = image.split("@")[0]
        if not image or ":" not in ref.rsplit("/", 1)[-1] or ref.endswith(":latest"):
            out.append(f"{name}: image {image!r} is not pinned to a tag")
    return out


def service_problems(doc: Doc) -> list[str]:
    services = doc["services"]
    out = [f"{s}: missing" for s in SIX if module_of(services.get(s, {})) != f"services.{s}"]
    for name, svc in services.items():
        module = module_of(svc)
        if not module:
            continue
        env = svc.get("environment", {})
        if not isinstance(env, dict):
            out.append(f"{name}: environment is a list; write it as a mapping so it can be checked")
            continue
        allowed = env_names(SETTINGS[module]) | set(healthcheck.ENV_VARS)
        out += [
            f"{name}: {var} is no setting of {module}" for var in env if var.startswith("LOOM_") and var not in allowed
        ]
        if module == "services.common.provision":
            continue
        grace = float(env.get("LOOM_DRAIN_GRACE_S", 10))
        stop = str(svc.get("stop_grace_period", "10s"))
        if float(stop.removesuffix("s")) <= grace:
            out.append(f"{name}: stop_grace_period {stop} is not longer than LOOM_DRAIN_GRACE_S={grace:g}")
        after = svc.get("depends_on", {}).get("provision", {})
        if after.get("condition") != "service_completed_successfully":
            out.append(f"{name}: does not wait for provision to complete")
    return out


def fusion_problems(doc: Doc) -> list[str]:
    """Core-lane partitions: every fusion replica has its own index, and the indexes cover 0..count-1."""
    fusions = {n: s for n, s in doc["services"].items() if module_of(s) == "services.fusion"}
    out, seen = [], []
    for name, svc in fusions.items():
        if svc.get("deploy", {}).get("replicas", 1) != 1:
            out.append(f"{name}: replicas of one service share LOOM_FUSION_REPLICA_INDEX; run one per service")
        env = svc.get("environment", {})
        seen.append((int(env.get("LOOM_FUSION_REPLICA_INDEX", 0)), int(env.get("LOOM_FUSION_REPLICA_COUNT", 1))))
    counts = {count for _, count in seen}
    if len(counts) != 1 or sorted(i for i, _ in seen) != list(range(len(seen))) or counts != {len(seen)}:
        out.append(f"fusion (index, count) pairs {sorted(seen)} do not cover the partitions once")
    return out


def nats_problems(doc: Doc) -> list[str]:
    nodes = {
        n: flags(s["command"]) for n, s in doc["services"].items() if (s.get("command") or [""])[0] == "nats-server"
    }
    out = [] if len(nodes) == 3 else [f"{len(nodes)} NATS nodes, not 3"]
    names = [f.get("name") for f in nodes.values()]
    if len(set(names)) != len(names):
        out.append(f"server names not unique: {names}")
    if len({f.get("cluster_name") for f in nodes.values()}) != 1:
        out.append("the nodes disagree on cluster_name")
    for name, f in nodes.items():
        if (
            "jetstream" not in doc["services"][name]["command"]
            and "--jetstream" not in doc["services"][name]["command"]
        ):
            out.append(f"{name}: JetStream is off")
        routes = set(f.get("routes", "").split(","))
        for other, g in nodes.items():
            port = g.get("cluster", ":6222").rsplit(":", 1)[-1]
            if other != name and f"nats://{other}:{port}" not in routes:
                out.append(f"{name}: no route to {other}")
    for name, svc in doc["services"].items():
        url = svc.get("environment", {}).get("LOOM_NATS_URL")
        if url is not None and {u.split("//")[1].split(":")[0] for u in url.split(",")} != set(nodes):
            out.append(f"{name}: LOOM_NATS_URL {url} does not list every NATS node")
    return out


def dependency_problems(doc: Doc) -> list[str]:
    services = doc["services"]
    out = []
    for name, svc in services.items():
        deps = svc.get("depends_on", {})
        out += [f"{name}: depends on unknown service {d}" for d in deps if d not in services]
    return out


def mount_problems(doc: Doc, base: Path) -> list[str]:
    out = []
    for name, svc in doc["services"].items():
        for vol in svc.get("volumes", []):
            source = vol.split(":")[0] if isinstance(vol, str) else vol.get("source", "")
            if source.startswith((".", "/")) and not (base / source).resolve().exists():
                out.append(f"{name}: mounts {source}, which does not exist")
    return out


def triton_problems(doc: Doc) -> list[str]:
    out = []
    for profile in ("cpu", "gpu"):
        tritons = [
            (n, s)
            for n, s in doc["services"].items()
            if profile in s.get("profiles", [])
            and "triton" in s.get("networks", {}).get("default", {}).get("aliases", [])
        ]
        if len(tritons) != 1:
            out.append(f"profile {profile}: {len(tritons)} services answer as triton, not 1")
            continue
        name, svc = tritons[0]
        devices = svc.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
        gpu = any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices)
        if (profile == "gpu") != gpu:
            out.append(f"{name}: GPU reservation {'missing' if profile == 'gpu' else 'on the CPU profile'}")
        if (profile == "gpu") != ("--model-config-name=gpu" in svc.get("command", [])):
            out.append(f"{name}: --model-config-name=gpu belongs to the gpu profile only")
    return out


def port_problems(doc: Doc) -> list[str]:
    return [f"{n}: publishes host ports" for n, s in doc["services"].items() if s.get("ports") and n not in PUBLISHERS]


def env_example_problems(text: str, example: str) -> list[str]:
    """.env.example names every variable the file requires, with placeholders only."""
    values = dict(line.split("=", 1) for line in example.splitlines() if "=" in line and not line.startswith("#"))
    out = [f"{v}: missing from .env.example" for v in sorted(required_vars(text) - set(values))]
    out += [f"{k}: .env.example holds a value, not a placeholder" for k, v in values.items() if v != "replace-me"]
    return out


CHECKS: list[Callable[[Doc], list[str]]] = [
    image_problems,
    service_problems,
    fusion_problems,
    nats_problems,
    dependency_problems,
    triton_problems,
    port_problems,
    lambda doc: mount_problems(doc, COMPOSE_DIR),
]


def problems(path: Path) -> list[str]:
    doc = yaml.safe_load(path.read_text())
    return [p for check in CHECKS for p in check(doc)]


# --- schema -----------------------------------------------------------------------------------------


def schema_check(path: Path) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec", str(path)]
    if shutil.which("check-jsonschema", path=str(Path(sys.executable).parent)) is None:
        pytest.fail("check-jsonschema is not installed: `make venv` installs it")
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


def test_compose_file_matches_the_compose_spec() -> None:
    done = schema_check(COMPOSE)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize(
    "edit",
    [
        lambda t: t.replace("condition: service_completed_successfully", "condition: service_done"),
        lambda t: t.replace("      replicas: 2 # queue groups", "      replica: 2 # queue groups"),
        lambda t: t.replace("  shm_size: 1gb", "  shm_size: [1gb]"),
    ],
)
def test_schema_fails_on_a_broken_copy(tmp_path: Path, edit: Callable[[str], str]) -> None:
    text = edit(COMPOSE.read_text())
    assert text != COMPOSE.read_text()
    (tmp_path / "compose.yaml").write_text(text)
    assert schema_check(tmp_path / "compose.yaml").returncode != 0


# --- semantics --------------------------------------------------------------------------------------


def test_compose_semantics() -> None:
    assert problems(COMPOSE) == []
    assert env_example_problems(COMPOSE.read_text(), (COMPOSE_DIR / ".env.example").read_text()) == []
    assert ".env" in (COMPOSE_DIR / ".gitignore").read_text().split()


def _svc(doc: Doc, name: str) -> Doc:
    return doc["services"][name]  # type: ignore[no-any-return]


BREAKS: dict[str, tuple[Callable[[Doc], None], str]] = {
    "untagged image": (
        lambda d: _svc(d, "jaeger").update(image="jaegertracing/all-in-one"),
        "jaeger: image 'jaegertracing/all-in-one' is not pinned",
    ),
    "latest image": (lambda d: _svc(d, "grafana").update(image="grafana/grafana:latest"), "grafana: image"),
    "service gone": (lambda d: d["services"].pop("postprocess"), "postprocess: missing"),
    "typo in a setting": (
        lambda d: _svc(d, "inference")["environment"].update(LOOM_INFERENCE_TRITON_ULR="triton:8001"),
        "LOOM_INFERENCE_TRITON_ULR is no setting of services.inference",
    ),
    "another service's setting": (
        lambda d: _svc(d, "gateway")["environment"].update(LOOM_MONITOR_TRITON_URL="triton:8000"),
        "gateway: LOOM_MONITOR_TRITON_URL is no setting",
    ),
    "short grace": (lambda d: _svc(d, "preprocess").update(stop_grace_period="15s"), "not longer than"),
    "no provision wait": (lambda d: _svc(d, "monitor")["depends_on"].pop("provision"), "monitor: does not wait"),
    "replicated fusion": (lambda d: _svc(d, "fusion")["deploy"].update(replicas=2), "fusion: replicas of one"),
    "fusion count": (
        lambda d: _svc(d, "fusion")["environment"].update(LOOM_FUSION_REPLICA_COUNT="2"),
        "do not cover the partitions",
    ),
    "two NATS": (lambda d: d["services"].pop("nats-3"), "2 NATS nodes, not 3"),
    "missing route": (
        lambda d: _svc(d, "nats-2")["command"].__setitem__(-1, "--routes=nats://nats-1:6222,nats://nats-2:6222"),
        "nats-2: no route to nats-3",
    ),
    "no JetStream": (lambda d: _svc(d, "nats-1")["command"].remove("--jetstream"), "nats-1: JetStream is off"),
    "cluster name": (lambda d: _svc(d, "nats-3")["command"].__setitem__(6, "--cluster_name=other"), "cluster_name"),
    "URL misses a node": (
        lambda d: _svc(d, "provision")["environment"].update(LOOM_NATS_URL="nats://nats-1:4222"),
        "provision: LOOM_NATS_URL",
    ),
    "unknown dependency": (
        lambda d: _svc(d, "grafana")["depends_on"].update(promethues={"condition": "service_started"}),
        "grafana: depends on unknown service promethues",
    ),
    "missing mount": (
        lambda d: _svc(d, "prometheus")["volumes"].__setitem__(1, "../monitoring/rules/alerts.yml:/x:ro"),
        "prometheus: mounts ../monitoring/rules/alerts.yml",
    ),
    "no cpu triton": (lambda d: _svc(d, "triton-cpu").update(profiles=["laptop"]), "profile cpu: 0 services"),
    "gpu without GPU": (lambda d: _svc(d, "triton-gpu").pop("deploy"), "triton-gpu: GPU reservation missing"),
    "gpu config on cpu": (
        lambda d: _svc(d, "triton-cpu")["command"].append("--model-config-name=gpu"),
        "triton-cpu: --model-config-name=gpu",
    ),
    "published port": (lambda d: _svc(d, "nats-1").update(ports=["4222:4222"]), "nats-1: publishes host ports"),
}


@pytest.mark.parametrize("case", list(BREAKS))
def test_semantic_checks_fail_on_a_broken_copy(tmp_path: Path, case: str) -> None:
    doc = yaml.safe_load(COMPOSE.read_text())
    edit, expected = BREAKS[case]
    broken = copy.deepcopy(doc)
    edit(broken)
    assert broken != doc
    path = tmp_path / "compose.yaml"
    path.write_text(yaml.safe_dump(broken))
    found = problems(path)
    assert any(expected in p for p in found), found


def test_env_example_check_fails_on_a_broken_copy() -> None:
    text, example = COMPOSE.read_text(), (COMPOSE_DIR / ".env.example").read_text()
    assert any(
        "GRAFANA_ADMIN_PASSWORD: missing" in p
        for p in env_example_problems(text, example.replace("GRAFANA", "GRAFANO"))
    )
    leaked = example.replace("LOOM_DEV_API_KEY=replace-me", "LOOM_DEV_API_KEY=3f9a1c")
    assert env_example_problems(text, leaked) == ["LOOM_DEV_API_KEY: .env.example holds a value, not a placeholder"]


def test_prometheus_config_passes_promtool(tmp_path: Path) -> None:
    """deploy/compose/prometheus.yml with its container paths pointed at the repository's files."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool is not installed: run `make debs`")
    key = tmp_path / "key"
    key.write_text("k")
    text = (COMPOSE_DIR / "prometheus.yml").read_text()
    text = text.replace("/etc/prometheus/rules/", str(ROOT / "deploy" / "monitoring" / "rules") + "/")
    text = text.replace("/run/secrets/loom-api-key", str(key))
    (tmp_path / "prometheus.yml").write_text(text)
    done = subprocess.run(
        [promtool, "check", "config", str(tmp_path / "prometheus.yml")], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr
    # The jobs the alert rules name exist here, and a job scraping nothing fails the check.
    jobs = {j["job_name"] for j in yaml.safe_load(text)["scrape_configs"]}
    assert {*SIX, "triton"} <= jobs
    (tmp_path / "prometheus.yml").write_text(text.replace("rules/loom-alerts.yml", "rules/missing.yml"))
    assert subprocess.run(
        [promtool, "check", "config", str(tmp_path / "prometheus.yml")], capture_output=True
    ).returncode
