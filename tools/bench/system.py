"""The machine the benchmark runs on: CPU use around a level, hardware and tool versions.

The mesh runs on the same cores as the load generator, and other people's work
may run there too; :func:`cpu_snapshot` lets each level report how much CPU went
to processes outside this benchmark's own process tree.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path

from services.common.launch.nats_server import nats_server_binary


def _cpu_busy_s() -> float:
    """Busy CPU seconds of the whole machine, summed over CPUs (/proc/stat)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _tree_cpu_s(root: int) -> float:
    """CPU seconds used so far by ``root`` and all its descendants (the mesh is started by this process)."""
    children: dict[int, list[int]] = {}
    used: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            rest = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # gone meanwhile
        pid = int(entry.name)
        children.setdefault(int(rest[1]), []).append(pid)  # ppid
        used[pid] = int(rest[11]) + int(rest[12])  # utime + stime
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        total += used.get(pid, 0)
        todo.extend(children.get(pid, ()))
    return total / os.sysconf("SC_CLK_TCK")


def cpu_snapshot() -> tuple[float, float]:
    """(machine busy CPU s, this benchmark's tree CPU s); their deltas tell how much else ran."""
    try:
        return _cpu_busy_s(), _tree_cpu_s(os.getpid())
    except (OSError, ValueError, IndexError):
        return float("nan"), float("nan")


def foreign_cpu_pct(before: tuple[float, float], after: tuple[float, float], wall_s: float) -> float:
    """Share of all cores, in percent, that processes outside this benchmark's tree used between two snapshots."""
    foreign = (after[0] - before[0]) - (after[1] - before[1])
    return max(0.0, 100.0 * foreign / (wall_s * (os.cpu_count() or 1))) if wall_s > 0 else float("nan")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def memory_total() -> str:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                kib = int(line.split()[1])
                return f"{kib / 1024 / 1024:.1f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    return "unknown"


def package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def nats_server_version() -> str:
    try:
        out = subprocess.run([nats_server_binary(), "--version"], capture_output=True, text=True, timeout=10)
        return (out.stdout or out.stderr).strip().removeprefix("nats-server:").strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def tool_versions() -> dict[str, str]:
    return {
        "nvidia-pytriton wheel": package_version("nvidia-pytriton"),
        "tritonclient": package_version("tritonclient"),
        "nats-server": nats_server_version(),
        "grpcio": package_version("grpcio"),
        "aiohttp": package_version("aiohttp"),
        "onnxruntime": package_version("onnxruntime"),
        "rapidocr_onnxruntime": package_version("rapidocr_onnxruntime"),
        "Pillow": package_version("Pillow"),
    }
