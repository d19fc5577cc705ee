# Loom: one image for all six services; the command picks the service.
#
#   docker build -t ghcr.io/loom-mesh/loom:0.1.0 .
#   docker run --rm -e LOOM_NATS_URL=nats://nats:4222 ghcr.io/loom-mesh/loom:0.1.0 python -m services.preprocess
#
# Signals: python is PID 1 (no init, no shell in between). Each service handles SIGTERM and
# SIGINT itself: health turns NOT_SERVING, in-flight work drains for up to LOOM_DRAIN_GRACE_S,
# then it exits. Give the container longer than that to stop (docker stop -t, Compose's
# stop_grace_period, Kubernetes' terminationGracePeriodSeconds). The services start no child
# processes, so nothing needs reaping; `docker run --init` does no harm if you want one anyway.
#
# The base is pinned by tag and by the digest of its multi-architecture index. Bump both together
# (docker buildx imagetools inspect python:<tag> prints the digest).

# --- build: a virtual environment with the runtime dependencies, pinned by requirements.lock ---
FROM python:3.11.14-slim-bookworm@sha256:65a93d69fa75478d554f4ad27c85c1e69fa184956261b4301ebaf6dbb0a3543d AS build

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
COPY pyproject.toml requirements.lock requirements-nodeps.txt ./
# Only what the services need: pyproject's [project] dependencies, each resolved at the version
# requirements.lock pins (-c), so the dev extra (pytest, mypy, hadolint ...) stays out. Wheels
# only: every pinned package ships one, and the build stage needs no compiler. The three
# packages of requirements-nodeps.txt go in --no-deps, as in `make venv` (their declared
# dependencies pull torch and the GUI build of OpenCV). setuptools is pinned here because pip
# freeze leaves it out of the lock and grpcio-tools needs >= 77.0.1: the version `make venv` has.
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > runtime.txt \
    && python -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir --only-binary=:all: -c requirements.lock -r runtime.txt setuptools==84.2.1 \
    && /opt/venv/bin/pip install --no-cache-dir --only-binary=:all: --no-deps -r requirements-nodeps.txt

# --- runtime: the venv, the source tree, nothing to build with ---------------------------------
FROM python:3.11.14-slim-bookworm@sha256:65a93d69fa75478d554f4ad27c85c1e69fa184956261b4301ebaf6dbb0a3543d

ARG VERSION=0.1.0
ARG REVISION=unknown
ARG CREATED=unknown
LABEL org.opencontainers.image.title="loom" \
      org.opencontainers.image.description="Event-driven microservice mesh serving multimodal AI models on NVIDIA Triton: gateway, preprocess, inference, postprocess, fusion, monitor" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.source="https://github.com/loom-mesh/loom" \
      org.opencontainers.image.url="https://github.com/loom-mesh/loom" \
      org.opencontainers.image.documentation="https://github.com/loom-mesh/loom/blob/main/deploy/README.md" \
      org.opencontainers.image.vendor="loom-mesh" \
      org.opencontainers.image.base.name="docker.io/library/python:3.11.14-slim-bookworm"

# The code finds its data next to itself (deploy/pipelines, deploy/asyncapi.yaml, pyproject.toml
# for the version), so it runs from this source tree, not from site-packages.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONPATH=/app \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    LOOM_BIND_HOST=0.0.0.0

RUN groupadd --system --gid 10001 loom \
    && useradd --system --no-log-init --uid 10001 --gid loom --home-dir /app --shell /usr/sbin/nologin loom

WORKDIR /app
COPY --from=build /opt/venv /opt/venv
COPY pyproject.toml ./
COPY services ./services
COPY tools/__init__.py ./tools/__init__.py
COPY tools/loomctl ./tools/loomctl
COPY deploy/pipelines ./deploy/pipelines
COPY deploy/nats ./deploy/nats
COPY deploy/asyncapi.yaml ./deploy/asyncapi.yaml
# Bytecode now, as root: at run time the tree is read-only to the service user.
RUN python -m compileall -q services tools

USER 10001:10001

# gRPC and HTTP ports of gateway, preprocess, inference, postprocess, fusion, monitor.
EXPOSE 50051 8080 50052 9102 50053 9103 50054 9104 50055 9105 50056 8090

# The service's gRPC health on 127.0.0.1; which service: LOOM_SERVICE, else PID 1's command line.
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-m", "services.common.healthcheck"]

CMD ["python", "-m", "services.gateway"]
