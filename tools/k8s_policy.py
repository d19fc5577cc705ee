"""Policy over rendered Kubernetes objects: what Loom's manifests must hold beyond their schemas.

Each check takes the objects of one rendered overlay and returns problems, one line each, naming
the object (``Deployment/loom-gateway``) and what is wrong. ``tools.k8s_check`` runs them all.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import yaml

from services.common.durable import consumer_name

Obj = dict[str, Any]

WORKLOADS = ("Deployment", "StatefulSet")
POD_OWNERS = (*WORKLOADS, "DaemonSet", "ReplicaSet", "Job")
#: Durable-lane stage prefix -> the service that consumes loom.work.<prefix>.*.
STAGE_SERVICE = {"pre": "preprocess", "infer": "inference", "post": "postprocess"}
NATS_JETSTREAM_KEYS = {
    "natsServerMonitoringEndpoint",
    "account",
    "stream",
    "consumer",
    "lagThreshold",
    "activationLagThreshold",
    "useHttps",
}
NATS_JETSTREAM_REQUIRED = {"natsServerMonitoringEndpoint", "account", "stream", "consumer", "lagThreshold"}


def ref(obj: Obj) -> str:
    return f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"


def pod_spec(obj: Obj) -> Obj | None:
    spec: Obj | None = None
    if obj.get("kind") in POD_OWNERS:
        spec = obj.get("spec", {}).get("template", {}).get("spec")
    elif obj.get("kind") == "CronJob":
        spec = obj.get("spec", {}).get("jobTemplate", {}).get("spec", {}).get("template", {}).get("spec")
    return spec


def containers(spec: Obj) -> Iterator[Obj]:
    yield from spec.get("initContainers", []) or []
    yield from spec.get("containers", []) or []


def selects(selector: Obj | None, labels: dict[str, str]) -> bool:
    """Whether a Kubernetes label selector (matchLabels, matchExpressions) matches ``labels``."""
    selector = selector or {}
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr.get("key"), expr.get("operator"), expr.get("values") or []
        ok = {
            "In": key in labels and labels[key] in values,
            "NotIn": key not in labels or labels[key] not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }.get(op, False)
        if not ok:
            return False
    return True


def template_labels(obj: Obj) -> dict[str, str]:
    return obj.get("spec", {}).get("template", {}).get("metadata", {}).get("labels") or {}


# --- the checks -----------------------------------------------------------------------------------


def probes_and_resources(objs: list[Obj]) -> list[str]:
    problems = []
    for obj in objs:
        if obj.get("kind") not in WORKLOADS:
            continue
        for c in (pod_spec(obj) or {}).get("containers", []):
            where = f"{ref(obj)} container {c.get('name')}"
            problems += [f"{where}: no {p}" for p in ("readinessProbe", "livenessProbe") if not c.get(p)]
            res = c.get("resources") or {}
            for kind in ("requests", "limits"):
                missing = [r for r in ("cpu", "memory") if r not in (res.get(kind) or {})]
                problems += [f"{where}: no {r} in resources.{kind}" for r in missing]
    return problems


def disruption_budgets(objs: list[Obj]) -> list[str]:
    pdbs = [o for o in objs if o.get("kind") == "PodDisruptionBudget"]
    return [
        f"{ref(obj)}: no PodDisruptionBudget selects its pods"
        for obj in objs
        if obj.get("kind") in WORKLOADS
        and not any(selects(p.get("spec", {}).get("selector"), template_labels(obj)) for p in pdbs)
    ]


def pinned_images(objs: list[Obj]) -> list[str]:
    problems = []
    for obj in objs:
        for c in containers(pod_spec(obj) or {}):
            image = str(c.get("image", ""))
            if "@sha256:" in image:
                continue
            last = image.rsplit("/", 1)[-1]
            tag = last.split(":", 1)[1] if ":" in last else ""
            if not tag or tag == "latest":
                problems.append(f"{ref(obj)} container {c.get('name')}: image {image!r} is not pinned (tag or digest)")
    return problems


def non_root(objs: list[Obj]) -> list[str]:
    problems = []
    for obj in objs:
        spec = pod_spec(obj)
        if spec is None:
            continue
        pod_sc = spec.get("securityContext") or {}
        for c in containers(spec):
            sc = c.get("securityContext") or {}
            where = f"{ref(obj)} container {c.get('name')}"
            user = sc.get("runAsUser", pod_sc.get("runAsUser"))
            if sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is not True:
                problems.append(f"{where}: runAsNonRoot is not true")
            if user is None or user == 0:
                problems.append(f"{where}: runs as root (runAsUser {user})")
            if sc.get("privileged"):
                problems.append(f"{where}: privileged")
            if sc.get("allowPrivilegeEscalation") is not False:
                problems.append(f"{where}: allowPrivilegeEscalation is not false")
    return problems


def _env_value(c: Obj, name: str, config_maps: dict[str, dict[str, str]]) -> str | None:
    """A container's value of an environment variable: its env wins over its envFrom ConfigMaps."""
    for var in c.get("env") or []:
        if var.get("name") == name and "value" in var:
            return str(var["value"])
    for source in c.get("envFrom") or []:
        data = config_maps.get((source.get("configMapRef") or {}).get("name", ""), {})
        if name in data:
            return str(data[name])
    return None


def _prestop_sleep(c: Obj) -> float:
    pre = (c.get("lifecycle") or {}).get("preStop") or {}
    if "sleep" in pre:
        return float(pre["sleep"].get("seconds", 0))
    command = (pre.get("exec") or {}).get("command") or []
    if len(command) == 2 and command[0].endswith("sleep"):
        return float(command[1])
    return 0.0


def graceful_termination(objs: list[Obj]) -> list[str]:
    config_maps = {o["metadata"]["name"]: o.get("data") or {} for o in objs if o.get("kind") == "ConfigMap"}
    problems = []
    for obj in objs:
        if obj.get("kind") not in WORKLOADS:
            continue
        spec = pod_spec(obj) or {}
        grace = float(spec.get("terminationGracePeriodSeconds", 30))
        for c in spec.get("containers", []):
            drain = _env_value(c, "LOOM_DRAIN_GRACE_S", config_maps)
            if drain is None:
                continue
            need = float(drain) + _prestop_sleep(c)
            if grace <= need:
                problems.append(
                    f"{ref(obj)}: terminationGracePeriodSeconds {grace:g} must exceed "
                    f"LOOM_DRAIN_GRACE_S {drain} + preStop sleep {_prestop_sleep(c):g}"
                )
    return problems


def gpu_triton(objs: list[Obj]) -> list[str]:
    """In a GPU overlay: Triton asks for a GPU, tolerates the GPU taint and is pinned to GPU nodes."""
    problems = []
    tritons = [o for o in objs if o.get("kind") == "Deployment" and template_labels(o).get(COMPONENT) == "triton"]
    if not tritons:
        return ["no Triton Deployment (component triton) in a GPU overlay"]
    for obj in tritons:
        spec = pod_spec(obj) or {}
        for c in spec.get("containers", []):
            if int((c.get("resources") or {}).get("limits", {}).get("nvidia.com/gpu", 0)) < 1:
                problems.append(f"{ref(obj)} container {c.get('name')}: no nvidia.com/gpu in resources.limits")
        if not any(t.get("key") == "nvidia.com/gpu" for t in spec.get("tolerations") or []):
            problems.append(f"{ref(obj)}: no toleration for the nvidia.com/gpu taint")
        if not spec.get("nodeSelector") and not (spec.get("affinity") or {}).get("nodeAffinity"):
            problems.append(f"{ref(obj)}: no nodeSelector or node affinity for GPU nodes")
    return problems


COMPONENT = "app.kubernetes.io/component"


def network_policies(objs: list[Obj]) -> list[str]:
    """A default deny of ingress, and only the gateway open to traffic from anywhere."""
    policies = [o for o in objs if o.get("kind") == "NetworkPolicy"]
    pods = {ref(o): template_labels(o) for o in objs if pod_spec(o) is not None}
    problems = []
    if not any(
        p["spec"].get("podSelector") == {}
        and "Ingress" in p["spec"].get("policyTypes", [])
        and not p["spec"].get("ingress")
        for p in policies
    ):
        problems.append("no default-deny ingress NetworkPolicy (podSelector {}, policyTypes [Ingress], no rules)")
    for p in policies:
        if not any(_from_anywhere(rule) for rule in p["spec"].get("ingress") or []):
            continue
        chosen = [name for name, labels in pods.items() if selects(p["spec"].get("podSelector"), labels)]
        others = [name for name in chosen if pods[name].get(COMPONENT) != "gateway"]
        if others or not chosen:
            problems.append(
                f"{ref(p)}: lets traffic in from anywhere to {others or 'every pod'}; only the gateway may be"
            )
    return problems


def _from_anywhere(rule: Obj) -> bool:
    peers = rule.get("from")
    if not peers:
        return True
    return any((peer.get("ipBlock") or {}).get("cidr") in ("0.0.0.0/0", "::/0") for peer in peers)


def no_secret_values(objs: list[Obj]) -> list[str]:
    return [
        f"{ref(o)}: a Secret with values is rendered; create it in the cluster instead (secrets.example.sh)"
        for o in objs
        if o.get("kind") == "Secret" and (o.get("data") or o.get("stringData"))
    ]


def keda_triggers(objs: list[Obj]) -> list[str]:
    """nats-jetstream triggers name only known keys, and cover every durable consumer of the pipelines."""
    problems = []
    scaled = {o["spec"]["scaleTargetRef"]["name"]: o for o in objs if o.get("kind") == "ScaledObject"}
    watched: dict[str, set[str]] = {}
    for target, so in scaled.items():
        for trig in so["spec"].get("triggers") or []:
            if trig.get("type") != "nats-jetstream":
                continue
            meta = trig.get("metadata") or {}
            unknown, missing = set(meta) - NATS_JETSTREAM_KEYS, NATS_JETSTREAM_REQUIRED - set(meta)
            if unknown or missing:
                problems.append(
                    f"{ref(so)}: nats-jetstream trigger unknown {sorted(unknown)} missing {sorted(missing)}"
                )
            if meta.get("stream") == "LOOM_WORK":
                watched.setdefault(target, set()).add(str(meta.get("consumer")))
    for prefix, consumer in _pipeline_consumers(objs):
        target = f"loom-{STAGE_SERVICE[prefix]}"
        if target in scaled and consumer not in watched.get(target, set()):
            problems.append(f"{ref(scaled[target])}: no nats-jetstream trigger on consumer {consumer} of LOOM_WORK")
    return problems


def _pipeline_consumers(objs: list[Obj]) -> set[tuple[str, str]]:
    """(stage prefix, consumer) of every stage of the pipelines in the rendered loom-pipelines ConfigMap."""
    out = set()
    for cm in objs:
        if cm.get("kind") != "ConfigMap" or not cm["metadata"]["name"].startswith("loom-pipelines"):
            continue
        for text in (cm.get("data") or {}).values():
            for part in (yaml.safe_load(text) or {}).get("inputs", {}).values():
                for stage in part.get("stages", []):
                    prefix = stage.split(".", 1)[0]
                    if prefix in STAGE_SERVICE:
                        out.add((prefix, consumer_name(f"loom.work.{stage}")))
    return out


ALL: list[Callable[[list[Obj]], list[str]]] = [
    probes_and_resources,
    disruption_budgets,
    pinned_images,
    non_root,
    graceful_termination,
    network_policies,
    no_secret_values,
    keda_triggers,
]


def check(objs: list[Obj], gpu: bool) -> list[str]:
    """Every policy over one overlay's objects (and the GPU checks when it is a GPU overlay)."""
    problems = [p for rule in ALL for p in rule(objs)]
    return problems + (gpu_triton(objs) if gpu else [])
