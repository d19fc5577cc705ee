"""deploy/k8s: every overlay renders, validates against its schemas and meets the policy.

Each check also runs on a broken copy of deploy/k8s (one thing wrong) and must name the problem.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from tools import k8s_check, k8s_sync

pytestmark = pytest.mark.unit

K8S = k8s_check.K8S_DIR
BASE = Path("base")
GPU = Path("overlays/gpu")


def test_every_overlay_renders_and_passes() -> None:
    assert [p.name for p in k8s_check.overlays(K8S)] == ["cpu", "gpu", "gpu-predictive"]
    assert k8s_check.check(K8S) == []


def test_copies_are_in_sync() -> None:
    assert k8s_sync.stale() == []


def test_prometheus_rule_has_exactly_the_alert_groups() -> None:
    import yaml

    rules = yaml.safe_load((k8s_sync.ROOT / k8s_sync.RULES).read_text())
    generated = yaml.safe_load((K8S / "base/monitoring/prometheusrule.yaml").read_text())
    assert generated["spec"]["groups"] == rules["groups"]


def test_vendored_schemas_match_their_record() -> None:
    """Each schema file is byte for byte what deploy/k8s/schemas/README.md records (source, sha256)."""
    import hashlib

    readme = (K8S / "schemas/README.md").read_text()
    for name in k8s_check.CRD_SCHEMAS.values():
        digest = hashlib.sha256((K8S / "schemas" / name).read_bytes()).hexdigest()
        assert re.search(rf"`{re.escape(name)}`.*`{digest}`", readme), f"{name}: sha256 {digest} not recorded"


def test_stale_copy_is_reported(tmp_path: Path) -> None:
    for rel in ("deploy/pipelines", "deploy/nats", "deploy/monitoring/rules", "deploy/k8s/base"):
        shutil.copytree(k8s_sync.ROOT / rel, tmp_path / rel)
    assert k8s_sync.stale(tmp_path) == []
    spec = tmp_path / "deploy/pipelines/embed.yaml"
    spec.write_text(spec.read_text() + "# changed\n")
    (tmp_path / "deploy/pipelines/extra.yaml").write_text("name: extra\n")
    problems = k8s_sync.stale(tmp_path)
    assert any("config/pipelines/embed.yaml is out of date" in p for p in problems)
    assert any("lists" in p and "extra.yaml" in p for p in problems)
    k8s_sync.write(tmp_path)
    assert [p for p in k8s_sync.stale(tmp_path) if "lists" not in p] == []


# --- broken copies -------------------------------------------------------------------------------


def edit(path: Path, old: str, new: str, count: int = 1) -> None:
    text = path.read_text()
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new, count))


def cut(path: Path, marker: str) -> None:
    """Drop everything from ``marker`` on (the last objects of a file)."""
    text = path.read_text()
    assert marker in text, f"{marker!r} not in {path}"
    path.write_text(text[: text.index(marker)])


def append(path: Path, text: str) -> None:
    path.write_text(path.read_text() + text)


OPEN_POLICY = """---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: open-inference
spec:
  podSelector:
    matchLabels: {app.kubernetes.io/component: inference}
  ingress:
    - from:
        - ipBlock: {cidr: 0.0.0.0/0}
"""

SECRET = """---
apiVersion: v1
kind: Secret
metadata:
  name: loom-api-keys
stringData:
  keys.json: '[]'
"""

Breaker = Callable[[Path], None]

BREAKS: dict[str, tuple[Breaker, str]] = {
    "unknown field in a Deployment": (
        lambda d: edit(
            d / BASE / "services/gateway.yaml", "revisionHistoryLimit: 5", "revisionHistoryLimit: 5\n  replica: 3"
        ),
        r"Deployment/loom-gateway: schema apps/v1 Deployment: .*'replica' was unexpected",
    ),
    "wrong type": (
        lambda d: edit(d / BASE / "services/monitor.yaml", "replicas: 1", 'replicas: "one"'),
        r"Deployment/loom-monitor: schema apps/v1 Deployment: spec.replicas: 'one' is not of type",
    ),
    "bad ScaledObject field": (
        lambda d: edit(d / BASE / "autoscaling.yaml", "cooldownPeriod: 900", "cooldownPeriod: 900\n  maxReplicas: 9"),
        r"ScaledObject/loom-inference: schema keda.sh/v1alpha1 ScaledObject: spec: .*'maxReplicas' was unexpected",
    ),
    "misspelt nats-jetstream trigger key": (
        lambda d: edit(d / BASE / "autoscaling.yaml", 'lagThreshold: "20"', 'lagTreshold: "20"'),
        r"ScaledObject/loom-inference: nats-jetstream trigger unknown \['lagTreshold'\] missing \['lagThreshold'\]",
    ),
    "consumer without a trigger": (
        lambda d: edit(d / BASE / "autoscaling.yaml", "consumer: post_topics", "consumer: post_topic"),
        r"ScaledObject/loom-postprocess: no nats-jetstream trigger on consumer post_topics of LOOM_WORK",
    ),
    "unknown custom kind": (
        lambda d: append(
            d / BASE / "autoscaling.yaml",
            "---\napiVersion: keda.sh/v1alpha1\nkind: ScaledJob\nmetadata: {name: x}\nspec: {}\n",
        ),
        r"ScaledJob/x: no schema for keda.sh/v1alpha1 ScaledJob",
    ),
    "missing probe": (
        lambda d: edit(
            d / BASE / "services/preprocess.yaml",
            "          readinessProbe: {grpc: {port: 50052}, periodSeconds: 5, failureThreshold: 2}\n",
            "",
        ),
        r"Deployment/loom-preprocess container preprocess: no readinessProbe",
    ),
    "missing limit": (
        lambda d: edit(d / BASE / "services/fusion.yaml", "limits: {cpu: 500m, memory: 256Mi}", "limits: {cpu: 500m}"),
        r"StatefulSet/loom-fusion container fusion: no memory in resources.limits",
    ),
    "no PDB": (
        lambda d: cut(d / BASE / "triton.yaml", "---\napiVersion: policy/v1\nkind: PodDisruptionBudget"),
        r"Deployment/loom-triton: no PodDisruptionBudget selects its pods",
    ),
    "latest image": (
        lambda d: edit(d / BASE / "kustomization.yaml", "newTag: 2.15.1-alpine", "newTag: latest"),
        r"StatefulSet/loom-nats container nats: image 'nats:latest' is not pinned",
    ),
    "runAsUser 0": (
        lambda d: edit(d / BASE / "triton.yaml", "runAsUser: 10001", "runAsUser: 0"),
        r"Deployment/loom-triton container triton: runs as root \(runAsUser 0\)",
    ),
    "privilege escalation": (
        lambda d: edit(
            d / BASE / "provision-job.yaml", "allowPrivilegeEscalation: false", "allowPrivilegeEscalation: true"
        ),
        r"Job/loom-provision container provision: allowPrivilegeEscalation is not false",
    ),
    "grace shorter than the drain": (
        lambda d: edit(d / BASE / "config/loom.env", "LOOM_DRAIN_GRACE_S=20", "LOOM_DRAIN_GRACE_S=38"),
        r"Deployment/loom-gateway: terminationGracePeriodSeconds 40 must exceed "
        r"LOOM_DRAIN_GRACE_S 38 \+ preStop sleep 5",
    ),
    "missing gpu limit": (
        lambda d: edit(
            d / GPU / "triton-gpu.yaml",
            'limits: {cpu: "4", memory: 12Gi, nvidia.com/gpu: 1}',
            'limits: {cpu: "4", memory: 12Gi}',
        ),
        r"overlays/gpu: Deployment/loom-triton container triton: no nvidia.com/gpu in resources.limits",
    ),
    "missing gpu toleration": (
        lambda d: edit(d / GPU / "triton-gpu.yaml", "key: nvidia.com/gpu", "key: example.com/other"),
        r"overlays/gpu: Deployment/loom-triton: no toleration for the nvidia.com/gpu taint",
    ),
    "an extra open NetworkPolicy": (
        lambda d: append(d / BASE / "networkpolicies.yaml", OPEN_POLICY),
        r"NetworkPolicy/open-inference: lets traffic in from anywhere to \['Deployment/loom-inference'\]",
    ),
    "no default deny": (
        lambda d: edit(
            d / BASE / "networkpolicies.yaml", "  podSelector: {}\n", "  podSelector: {matchLabels: {x: y}}\n"
        ),
        r"no default-deny ingress NetworkPolicy",
    ),
    "a committed Secret value": (
        lambda d: append(d / BASE / "serviceaccount.yaml", SECRET),
        r"Secret/loom-api-keys: a Secret with values is rendered",
    ),
    "a broken kustomization": (
        lambda d: edit(d / BASE / "kustomization.yaml", "  - triton.yaml\n", "  - triton-missing.yaml\n"),
        r"overlays/cpu: kustomize failed: .*triton-missing.yaml",
    ),
}


@pytest.mark.parametrize("name", list(BREAKS))
def test_broken_copy_fails(name: str, tmp_path: Path) -> None:
    breaker, expected = BREAKS[name]
    copy = tmp_path / "k8s"
    shutil.copytree(K8S, copy)
    breaker(copy)
    # Render only the overlay the broken file shows in (each render and validation takes ~0.5 s).
    problems = k8s_check.check(copy, only=["gpu"] if "gpu" in name else ["cpu"])
    assert any(re.search(expected, p) for p in problems), "\n".join(problems) or "no problem found"


def test_secret_file_outside_the_render_is_found(tmp_path: Path) -> None:
    copy = tmp_path / "k8s"
    shutil.copytree(K8S, copy)
    (copy / "secrets.yaml").write_text(SECRET.lstrip("-\n"))
    (copy / "overlays/cpu/kustomization.yaml").write_text(
        (copy / "overlays/cpu/kustomization.yaml").read_text()
        + "secretGenerator:\n  - name: loom-nats-passwords\n    literals: [admin=abc]\n"
    )
    problems = k8s_check.committed_secrets(copy)
    assert "secrets.yaml: Secret loom-api-keys holds values: commit none" in problems
    assert "overlays/cpu/kustomization.yaml: secretGenerator loom-nats-passwords holds values: commit none" in problems


def test_cli_exit_code(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    copy = tmp_path / "k8s"
    shutil.copytree(K8S, copy)
    edit(copy / BASE / "triton.yaml", "runAsUser: 10001", "runAsUser: 0")
    assert k8s_check.main([str(copy)]) == 1
    assert "runs as root" in capsys.readouterr().out
