"""Launch the real ``tritonserver`` binary shipped in the ``nvidia-pytriton`` wheel.

The recipe (see FIELD-NOTES, Triton section) lives here in code:

* the binary is ``<site-packages>/pytriton/tritonserver/bin/tritonserver``;
* a backend directory ``<workdir>/backends/python/`` is assembled from the wheel's
  ``libtriton_python.so``, ``triton_python_backend_utils.py`` and the python-backend
  stub built for *this* interpreter's version;
* ``LD_LIBRARY_PATH`` = ``<site-packages>/nvidia_pytriton.libs`` + the interpreter's
  ``LIBDIR`` (without the first: ``libcudart... cannot open``; without the second the
  stub may load a mismatching system libpython);
* ``PATH`` starts with the directory of ``sys.executable`` (the stub takes its
  interpreter prefix from the first ``python3`` on PATH; PYTHONPATH is ignored).

The server runs in its own session/process group so that ``stop()`` can kill the
whole tree (server + python stubs). Python-backend shared memory regions get a
per-server prefix (``--backend-config=python,shm-region-prefix-name=...``) so the ones
left behind by killed stubs can be removed without touching other servers' regions.

Foreground use::

    python -m services.common.triton_server --model-repository deploy/triton \
        --grpc-port 8001
"""

from __future__ import annotations

import argparse
import compileall
import contextlib
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Self

from services.common.launch.procs import die_with_parent

__all__ = [
    "TritonServer",
    "TritonServerError",
    "find_pytriton_site_packages",
    "main",
    "precompile_models",
    "repository_models",
]

SHM_DIR = Path("/dev/shm")
SHM_PREFIX = "triton_python_backend_shm_region_"


class TritonServerError(RuntimeError):
    """tritonserver could not be started, did not become ready, or died."""


def find_pytriton_site_packages() -> Path:
    """The site-packages directory holding the ``pytriton`` package (not imported)."""
    spec = importlib.util.find_spec("pytriton")
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            candidate = Path(location).parent
            if (candidate / "pytriton" / "tritonserver" / "bin" / "tritonserver").is_file():
                return candidate
    purelib = Path(sysconfig.get_paths()["purelib"])
    if (purelib / "pytriton" / "tritonserver").is_dir():
        return purelib
    raise TritonServerError(
        "tritonserver binary not found: install nvidia-pytriton (0.7.x) into this interpreter's environment"
    )


def repository_models(model_repository: str | os.PathLike[str]) -> list[str]:
    """The model folders of a repository (those holding a ``config.pbtxt``), sorted.

    In explicit model-control mode Triton loads nothing by itself: these are the names to pass
    as ``--load-model`` so the server starts with every model, each with the versions its
    ``config.pbtxt``'s ``version_policy`` names (further versions are loaded later, through the
    model-control API with a config override).
    """
    root = Path(model_repository)
    if not root.is_dir():
        raise TritonServerError(f"model repository {root} is not a directory")
    return sorted(entry.name for entry in root.iterdir() if (entry / "config.pbtxt").is_file())


def precompile_models(path: str | os.PathLike[str]) -> bool:
    """Write the ``__pycache__`` of every ``model.py`` under ``path`` now, before Triton loads it.

    Why: the python backend's stub imports ``<version>/model.py`` and so writes
    ``<version>/__pycache__/`` on the version's first load. Triton sees the folder changed and, on
    the next load request for that model (in explicit mode: every change of its version_policy),
    re-initialises that version although nothing real changed (measured: each version was loaded
    twice). With the bytecode already there, a reload loads only new or really changed versions.
    Call it after copying a version folder in, before ``load_model``. Returns False when some file
    could not be compiled or written (a read-only repository): harmless, only the extra reload remains.
    """
    root = Path(path)
    if not root.is_dir():
        return False
    try:
        return bool(compileall.compile_dir(str(root), quiet=2, workers=1))
    except OSError:
        return False


class TritonServer:
    """One ``tritonserver`` process serving a model repository.

    Usable as a context manager: ``with TritonServer(repo) as server: ...`` starts,
    waits for readiness and stops.
    """

    def __init__(
        self,
        model_repository: str | os.PathLike[str],
        *,
        http_port: int = 8000,
        grpc_port: int = 8001,
        metrics_port: int = 8002,
        host: str = "127.0.0.1",
        workdir: str | os.PathLike[str] | None = None,
        log_file: str | os.PathLike[str] | None = None,
        extra_args: Sequence[str] = (),
        trace_otlp_url: str | None = None,
        trace_service_name: str | None = None,
        trace_api_key: str = "",
        model_control_mode: str = "none",
        load_models: Sequence[str] = (),
        model_config_name: str | None = None,
        gpu: bool = False,
        exit_timeout_s: int = 5,
        log_verbose: int = 0,
    ) -> None:
        if model_control_mode not in ("none", "explicit", "poll"):
            raise ValueError(f"model_control_mode must be 'none', 'explicit' or 'poll', not {model_control_mode!r}")
        self.model_repository = Path(model_repository).resolve()
        self.http_port = http_port
        self.grpc_port = grpc_port
        self.metrics_port = metrics_port
        self.host = host
        self.extra_args = list(extra_args)
        self.trace_otlp_url = trace_otlp_url
        self.trace_service_name = trace_service_name
        #: Sent as ``x-api-key`` with every span export (the Loom monitor's ingest needs credentials).
        self.trace_api_key = trace_api_key
        self.model_control_mode = model_control_mode
        self.load_models = list(load_models)
        self.model_config_name = model_config_name
        self.gpu = gpu
        self.exit_timeout_s = exit_timeout_s
        self.log_verbose = log_verbose

        self._own_workdir = workdir is None
        self.workdir = Path(tempfile.mkdtemp(prefix="loom-triton-")) if workdir is None else Path(workdir).resolve()
        self.log_file = Path(log_file).resolve() if log_file is not None else self.workdir / "tritonserver.log"
        # Unique per server: lets stop() find exactly this server's leftover regions.
        self.shm_prefix = f"{SHM_PREFIX}loom{uuid.uuid4().hex[:12]}_"

        self._proc: subprocess.Popen[bytes] | None = None
        self._log_handle: IO[bytes] | None = None
        self._shm_before: set[str] = set()
        self.started_at: float | None = None
        self.ready_after_s: float | None = None

    # ------------------------------------------------------------------ URLs
    @property
    def _client_host(self) -> str:
        return "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host

    @property
    def grpc_url(self) -> str:
        """``host:port`` as tritonclient.grpc expects it."""
        return f"{self._client_host}:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        """``host:port`` as tritonclient.http expects it."""
        return f"{self._client_host}:{self.http_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self._client_host}:{self.metrics_port}/metrics"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    # ------------------------------------------------------------------ setup
    def prepare_backends(self) -> Path:
        """Assemble ``<workdir>/backends/python`` from the wheel.

        Returns ``<workdir>/backends`` (the ``--backend-directory``).
        """
        ts = find_pytriton_site_packages() / "pytriton" / "tritonserver"
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        stub = ts / "python_backend_stubs" / version / "triton_python_backend_stub"
        if not stub.is_file():
            raise TritonServerError(f"no python backend stub for Python {version} in {stub.parent.parent}")
        target = self.workdir / "backends" / "python"
        target.mkdir(parents=True, exist_ok=True)
        for source in (
            ts / "backends" / "python" / "libtriton_python.so",
            ts / "backends" / "python" / "triton_python_backend_utils.py",
            stub,
        ):
            shutil.copy2(source, target / source.name)
        (target / stub.name).chmod(0o755)
        return target.parent

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        libs = [str(find_pytriton_site_packages() / "nvidia_pytriton.libs")]
        libdir = sysconfig.get_config_var("LIBDIR")
        if libdir:
            libs.append(str(libdir))
        if env.get("LD_LIBRARY_PATH"):
            libs.append(env["LD_LIBRARY_PATH"])
        env["LD_LIBRARY_PATH"] = os.pathsep.join(libs)
        bindir = os.path.dirname(os.path.abspath(sys.executable))
        env["PATH"] = os.pathsep.join([bindir, env.get("PATH", os.defpath)])
        if self.trace_api_key:
            # Triton's OTLP/HTTP exporter (opentelemetry-cpp 1.13) reads its headers from here and sends
            # the values as written, without URL-decoding: x-api-key, not "authorization=Bearer%20...".
            env["OTEL_EXPORTER_OTLP_TRACES_HEADERS"] = f"x-api-key={self.trace_api_key}"
        return env

    def command(self, backend_directory: Path | None = None) -> list[str]:
        binary = find_pytriton_site_packages() / "pytriton" / "tritonserver" / "bin" / "tritonserver"
        backends = backend_directory if backend_directory is not None else self.workdir / "backends"
        cmd = [
            str(binary),
            f"--model-repository={self.model_repository}",
            f"--backend-directory={backends}",
            f"--http-address={self.host}",
            f"--grpc-address={self.host}",
            f"--metrics-address={self.host}",
            f"--http-port={self.http_port}",
            f"--grpc-port={self.grpc_port}",
            f"--metrics-port={self.metrics_port}",
            "--exit-on-error=true",
            "--strict-readiness=true",
            f"--exit-timeout-secs={self.exit_timeout_s}",
            f"--model-control-mode={self.model_control_mode}",
            f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
            f"--log-verbose={self.log_verbose}",
        ]
        if not self.gpu:
            cmd += ["--allow-gpu-metrics=false", "--pinned-memory-pool-byte-size=0"]
        cmd += [f"--load-model={name}" for name in self.load_models]
        if self.model_config_name:
            cmd.append(f"--model-config-name={self.model_config_name}")
        if self.trace_otlp_url:
            cmd += [
                "--trace-config=mode=opentelemetry",
                "--trace-config=rate=1",
                "--trace-config=level=TIMESTAMPS",
                f"--trace-config=opentelemetry,url={self.trace_otlp_url}",
            ]
            if self.trace_service_name:
                cmd.append("--trace-config=opentelemetry,resource=service.name=" + self.trace_service_name)
        cmd += self.extra_args
        return cmd

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        if self.is_running():
            raise TritonServerError(f"tritonserver already running (pid {self.pid})")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        backends = self.prepare_backends()
        precompile_models(self.model_repository)
        cmd = self.command(backends)
        self._shm_before = shm_regions()
        log = open(self.log_file, "ab")  # noqa: SIM115 - closed in stop()
        self._log_handle = log
        self.started_at = time.monotonic()
        self.ready_after_s = None
        self._proc = subprocess.Popen(
            cmd,
            cwd=self.workdir,
            env=self.environment(),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=die_with_parent,
        )

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def is_ready(self) -> bool:
        url = f"http://{self._client_host}:{self.http_port}/v2/health/ready"
        try:
            with urllib.request.urlopen(url, timeout=1.0) as response:
                return bool(response.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def wait_ready(self, timeout: float = 60.0) -> float:
        """Wait for ``/v2/health/ready`` to answer 200; return seconds since start()."""
        if self._proc is None or self.started_at is None:
            raise TritonServerError("wait_ready() called before start()")
        deadline = time.monotonic() + timeout
        while True:
            code = self._proc.poll()
            if code is not None:
                raise TritonServerError(
                    f"tritonserver exited with code {code} before becoming ready; "
                    f"log {self.log_file}:\n{self.log_tail()}"
                )
            if self.is_ready():
                self.ready_after_s = time.monotonic() - self.started_at
                return self.ready_after_s
            if time.monotonic() >= deadline:
                raise TritonServerError(
                    f"tritonserver not ready after {timeout:.1f}s "
                    f"(pid {self._proc.pid}); "
                    f"log {self.log_file}:\n{self.log_tail()}"
                )
            time.sleep(0.1)

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM the process group, SIGKILL what is left after ``timeout``.

        Then removes this server's leftover shm regions. Returns the exit code.
        """
        proc = self._proc
        code: int | None = None
        if proc is not None:
            pgid = proc.pid  # start_new_session: the server leads its own group
            _signal_group(pgid, signal.SIGTERM)
            try:
                code = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                _signal_group(pgid, signal.SIGKILL)
                code = proc.wait(timeout=10.0)
            # Stubs that outlive the server (or ignored SIGTERM) go too.
            deadline = time.monotonic() + 3.0
            while _group_alive(pgid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if _group_alive(pgid):
                _signal_group(pgid, signal.SIGKILL)
                time.sleep(0.1)
            self._proc = None
        if self._log_handle is not None:
            with contextlib.suppress(Exception):
                self._log_handle.close()
            self._log_handle = None
        self.cleanup_shm()
        return code

    def cleanup_shm(self) -> list[str]:
        """Remove this server's leftover python-backend shm regions (names returned)."""
        removed: list[str] = []
        if not SHM_DIR.is_dir():
            return removed
        for entry in SHM_DIR.iterdir():
            if entry.name.startswith(self.shm_prefix):
                with contextlib.suppress(FileNotFoundError):
                    entry.unlink()
                    removed.append(entry.name)
        return removed

    def owned_shm_regions(self) -> list[str]:
        return sorted(name for name in shm_regions() if name.startswith(self.shm_prefix))

    def new_shm_regions(self) -> set[str]:
        """Regions that appeared since start() (any owner; for diagnostics)."""
        return shm_regions() - self._shm_before

    def log_tail(self, lines: int = 40) -> str:
        try:
            with open(self.log_file, "rb") as handle:
                handle.seek(0, os.SEEK_END)
                size = handle.tell()
                handle.seek(max(0, size - 64 * 1024))
                text = handle.read().decode("utf-8", errors="replace")
        except OSError as exc:
            return f"<log unavailable: {exc}>"
        return "\n".join(text.splitlines()[-lines:])

    def close(self) -> None:
        """stop() and remove the temporary workdir if this object created it."""
        self.stop()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Self:
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close()  # also drops a temporary workdir
        else:
            self.stop()  # keep the log for the post-mortem

    def __repr__(self) -> str:
        return f"TritonServer(repo={self.model_repository}, grpc={self.grpc_url}, pid={self.pid})"


def shm_regions() -> set[str]:
    """Python-backend shared-memory regions present now (any server's)."""
    if not SHM_DIR.is_dir():
        return set()
    return {entry.name for entry in SHM_DIR.iterdir() if entry.name.startswith(SHM_PREFIX)}


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m services.common.triton_server",
        description="Run the nvidia-pytriton tritonserver binary on a model repository, in the foreground.",
    )
    parser.add_argument("--model-repository", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--http-port", type=int, default=8000)
    parser.add_argument("--grpc-port", type=int, default=8001)
    parser.add_argument("--metrics-port", type=int, default=8002)
    parser.add_argument(
        "--workdir",
        default=None,
        help="backend dir + log go here (default: a temp dir)",
    )
    parser.add_argument("--log-file", default=None, help="default: <workdir>/tritonserver.log")
    parser.add_argument(
        "--trace-otlp-url",
        default=None,
        help="OTLP/HTTP(JSON) traces URL, e.g. host:4318/v1/traces",
    )
    parser.add_argument("--trace-service-name", default=None)
    parser.add_argument("--model-control-mode", default="none", choices=["none", "explicit", "poll"])
    parser.add_argument(
        "--load-model",
        action="append",
        default=[],
        help="with explicit mode; repeatable (default there: every model folder of the repository)",
    )
    parser.add_argument(
        "--model-config-name",
        default=None,
        help="e.g. 'gpu' to use <model>/configs/gpu.pbtxt",
    )
    parser.add_argument(
        "--gpu",
        action="store_true",
        help="keep GPU metrics / pinned memory; implies --model-config-name=gpu",
    )
    parser.add_argument("--log-verbose", type=int, default=0)
    parser.add_argument("--ready-timeout", type=float, default=120.0)
    parser.add_argument(
        "extra",
        nargs=argparse.REMAINDER,
        help="after '--': passed to tritonserver unchanged",
    )
    args = parser.parse_args(argv)
    extra = [a for a in args.extra if a != "--"] if args.extra else []
    load_models = list(args.load_model)
    if args.model_control_mode == "explicit" and not load_models:
        load_models = repository_models(args.model_repository)

    server = TritonServer(
        args.model_repository,
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        metrics_port=args.metrics_port,
        host=args.host,
        workdir=args.workdir,
        log_file=args.log_file,
        extra_args=extra,
        trace_otlp_url=args.trace_otlp_url,
        trace_service_name=args.trace_service_name,
        model_control_mode=args.model_control_mode,
        load_models=load_models,
        model_config_name=args.model_config_name or ("gpu" if args.gpu else None),
        gpu=args.gpu,
        log_verbose=args.log_verbose,
    )

    def _on_signal(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    # SIGINT explicitly too: a shell starts background jobs with SIGINT ignored.
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    print(f"starting tritonserver; log: {server.log_file}", file=sys.stderr, flush=True)
    try:
        server.start()
        took = server.wait_ready(args.ready_timeout)
        print(
            f"tritonserver ready in {took:.1f}s: grpc {server.grpc_url}, "
            f"http {server.http_url}, "
            f"metrics {server.metrics_url} (pid {server.pid}); Ctrl-C to stop",
            file=sys.stderr,
            flush=True,
        )
        while server.is_running():
            time.sleep(0.5)
        print(
            f"tritonserver exited on its own; log tail:\n{server.log_tail()}",
            file=sys.stderr,
        )
        return 1
    except KeyboardInterrupt:
        print("stopping tritonserver", file=sys.stderr, flush=True)
        return 0
    except TritonServerError as exc:
        print(str(exc), file=sys.stderr)
        return 1
    finally:
        # A second Ctrl-C must not interrupt the (bounded) cleanup.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        code = server.stop()
        if code is not None:
            print(f"tritonserver exit code {code}", file=sys.stderr, flush=True)
        if code == 0 and args.workdir is None and args.log_file is None:
            server.close()  # clean exit: drop the temporary workdir


if __name__ == "__main__":
    sys.exit(main())
