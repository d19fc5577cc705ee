"""Check Loom's Kubernetes manifests offline: render, validate against schemas, apply the policy.

For every overlay under ``<dir>/overlays``: ``kubectl kustomize`` renders it; each built-in object
is validated against the Kubernetes OpenAPI schemas shipped in the ``kubernetes-validate`` package
(strict: unknown fields fail); each custom resource against the CRD schema vendored in
``<dir>/schemas`` (an apiVersion/kind with no schema fails); then ``tools.k8s_policy`` runs.
Besides, no file under ``<dir>`` may hold a Secret's values::

    python -m tools.k8s_check [deploy/k8s]     # prints the problems; exit 1 if there are any

Against this checkout's deploy/k8s it also checks that the copies made by ``tools.k8s_sync`` are
up to date.
"""

from __future__ import annotations

import functools
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Collection
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import kubernetes_validate.utils
import yaml
from referencing import Registry, Resource

from tools import k8s_policy, k8s_sync

K8S_DIR = k8s_sync.ROOT / "deploy/k8s"
#: Kubernetes version the built-in kinds are validated against (the oldest the manifests support).
KUBE_VERSION = "1.30"
#: Custom resources Loom uses -> their vendored schema (see deploy/k8s/schemas/README.md).
CRD_SCHEMAS = {
    ("keda.sh/v1alpha1", "ScaledObject"): "scaledobject_v1alpha1.json",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "servicemonitor_v1.json",
    ("monitoring.coreos.com/v1", "PrometheusRule"): "prometheusrule_v1.json",
}

Obj = dict[str, Any]
#: libyaml when PyYAML has it: the rendered overlays are ~2,000 lines each.
LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def kubectl() -> str | None:
    return shutil.which("kubectl") or ("/usr/bin/kubectl" if Path("/usr/bin/kubectl").is_file() else None)


def render(overlay: Path) -> tuple[list[Obj], list[str]]:
    """The objects ``kubectl kustomize`` makes of an overlay, or the problem that stopped it."""
    binary = kubectl()
    if binary is None:
        return [], ["kubectl not found (it carries Kustomize): install it to render the overlays"]
    run = subprocess.run([binary, "kustomize", str(overlay)], capture_output=True, text=True, timeout=60)
    if run.returncode != 0:
        lines = [line for line in run.stderr.strip().splitlines() if line.strip()] or ["(no message)"]
        return [], [f"kustomize failed: {lines[-1]}"]
    return [doc for doc in yaml.load_all(run.stdout, Loader=LOADER) if doc], []


@functools.cache
def _crd_validator(path: Path) -> jsonschema.protocols.Validator:
    schema = json.loads(path.read_text())
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft7Validator)
    return cls(schema)


@functools.cache
def _builtin_validator(api_version: str, kind: str) -> jsonschema.protocols.Validator:
    """kubernetes_validate.validate(..., strict=True) for one kind, with its schemas loaded once.

    The package re-reads its 1.3 MB definitions file for every object; this keeps one validator per
    kind (same files, same registry, same draft). Raises SchemaNotFoundError for an unknown kind.
    """
    group = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", api_version)
    root = f"kubernetes-json-schema/v{KUBE_VERSION}.0-local-strict"
    try:
        schema = kubernetes_validate.utils.schema_contents(f"{root}/{kind.lower()}-{group}.json", KUBE_VERSION)
    except FileNotFoundError:
        raise kubernetes_validate.SchemaNotFoundError(KUBE_VERSION, kind, api_version) from None
    definitions = kubernetes_validate.utils.schema_contents(f"{root}/_definitions.json", KUBE_VERSION)
    registry: Registry = Resource.from_contents(definitions) @ (Resource.from_contents(schema) @ Registry())
    return jsonschema.Draft202012Validator(schema, registry=registry)


def _where(error: jsonschema.ValidationError) -> str:
    return ".".join(str(p) for p in error.absolute_path) or "(top)"


def validate(objs: list[Obj], schemas: Path) -> list[str]:
    """Schema problems of each object: built-in kinds strictly, custom resources by their CRD schema."""
    problems = []
    for obj in objs:
        api, kind = obj.get("apiVersion", ""), obj.get("kind", "")
        name = f"{kind}/{obj.get('metadata', {}).get('name')}"
        if (api, kind) in CRD_SCHEMAS:
            validator = _crd_validator(schemas / CRD_SCHEMAS[api, kind])
            for error in sorted(validator.iter_errors(obj), key=lambda e: list(e.absolute_path)):
                problems.append(f"{name}: schema {api} {kind}: {_where(error)}: {error.message}")
            continue
        try:
            validator = _builtin_validator(api, kind)
        except kubernetes_validate.SchemaNotFoundError:
            problems.append(f"{name}: no schema for {api} {kind} (not built in, and none vendored in {schemas.name}/)")
            continue
        error = jsonschema.exceptions.best_match(validator.iter_errors(obj))
        if error is not None:
            problems.append(f"{name}: schema {api} {kind}: {_where(error)}: {error.message}")
    return problems


def committed_secrets(k8s_dir: Path) -> list[str]:
    """Secret values in any file: Secret objects with data, secretGenerator literals or env files."""
    problems = []
    for path in sorted(k8s_dir.rglob("*.y*ml")):
        try:
            docs = list(yaml.load_all(path.read_text(), Loader=LOADER))
        except yaml.YAMLError:
            continue  # kustomize reports broken YAML it loads; other files are not manifests
        for doc in docs:
            if not isinstance(doc, dict):
                continue
            rel = path.relative_to(k8s_dir)
            if doc.get("kind") == "Secret" and (doc.get("data") or doc.get("stringData")):
                problems.append(f"{rel}: Secret {doc.get('metadata', {}).get('name')} holds values: commit none")
            for gen in doc.get("secretGenerator") or []:
                if gen.get("literals") or gen.get("files") or gen.get("envs"):
                    problems.append(f"{rel}: secretGenerator {gen.get('name')} holds values: commit none")
    return problems


def overlays(k8s_dir: Path) -> list[Path]:
    return sorted(p.parent for p in (k8s_dir / "overlays").glob("*/kustomization.yaml"))


def check(k8s_dir: Path = K8S_DIR, only: Collection[str] = ()) -> list[str]:
    """Every problem of the manifests under ``k8s_dir`` (of the overlays named in ``only``, if given)."""
    found = [p for p in overlays(k8s_dir) if not only or p.name in only]
    problems = [] if found else [f"no overlays under {k8s_dir}/overlays"]
    for overlay in found:
        objs, failed = render(overlay)
        if not failed:
            failed = validate(objs, k8s_dir / "schemas")
            failed += k8s_policy.check(objs, gpu="gpu" in overlay.name)
        problems += [f"overlays/{overlay.name}: {p}" for p in failed]
    return problems + committed_secrets(k8s_dir)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    k8s_dir = Path(args[0]).resolve() if args else K8S_DIR
    problems = check(k8s_dir)
    if k8s_dir == K8S_DIR:
        problems += k8s_sync.stale()
    for problem in problems:
        print(problem)
    names = ", ".join(p.name for p in overlays(k8s_dir))
    print(f"{len(problems)} problem(s) in {k8s_dir} (overlays: {names})", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
