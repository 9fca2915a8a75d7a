# syntax=docker/dockerfile:1
# The device runtime: `reverie run` without torch. Build from the repository root:
#   docker build -t reverie-agent .
#   docker run -v $PWD/bundle:/models/bundle:ro \
#       -e REVERIE_BROKER=mqtt://broker:1883 -e REVERIE_DEVICE_ID=dev1 reverie-agent
# The install steps live in .ci/install-runtime.sh, which CI also runs (no Docker engine there).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
COPY agent ./agent
COPY export ./export
COPY firmware_sim ./firmware_sim
COPY .ci/install-runtime.sh ./.ci/install-runtime.sh
# HNSWLIB_NO_NATIVE=1 is set by the script; the numba cache is warmed into the image.
ENV NUMBA_CACHE_DIR=/opt/reverie/numba-cache
RUN bash .ci/install-runtime.sh /opt/reverie /src

FROM ${PYTHON_IMAGE}
RUN apt-get update \
 && apt-get install -y --no-install-recommends tini \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home-dir /var/lib/reverie --create-home reverie \
 && mkdir -p /run/reverie /models /var/lib/reverie/state \
 && chown reverie:reverie /run/reverie /var/lib/reverie/state \
 && chmod 0700 /var/lib/reverie/state
# The numba kernel cache (in /opt/reverie, owned by root) is read-only for the runtime
# user: a write there would be code execution at the next start. The daemon works on a
# private copy per run (agent/numba_cache.py).
COPY --from=build /opt/reverie /opt/reverie
ENV PATH=/opt/reverie/bin:$PATH \
    HNSWLIB_NO_NATIVE=1 \
    NUMBA_CACHE_DIR=/opt/reverie/numba-cache \
    PYTHONUNBUFFERED=1 \
    REVERIE_BUNDLE=/models/bundle \
    REVERIE_HEALTH_FILE=/run/reverie/health.json \
    REVERIE_STATE_DIR=/var/lib/reverie/state \
    REVERIE_LOG_FORMAT=json
USER reverie
WORKDIR /var/lib/reverie
# What the device learned (checkpoints + write-ahead log): keep it on a volume.
VOLUME ["/var/lib/reverie/state"]
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["reverie", "health", "--max-age", "30"]
# tini is PID 1: it forwards SIGTERM to reverie, which checkpoints and publishes "offline".
ENTRYPOINT ["tini", "--", "reverie", "run"]
