# The worker image: one small chat model on CPU behind Celery. Build: docker build -t allinone-worker .
# Run with docker compose (docker-compose.yml), or alone:
#   docker run --stop-timeout 180 -v allinone-models:/models -e ALLINONE_REDIS_URL=redis://HOST:6379/0 allinone-worker
#
# Build arguments, all optional:
#   BASE_IMAGE      a Debian-like image with Python 3.10+ and its venv module (default python:3.11-slim). A machine
#                   that cannot pull from a registry passes a local one.
#   PIP_NO_INDEX=1  install only from the wheels in wheelhouse/ (scripts/wheelhouse.sh fills it on the host), for
#                   builds behind a proxy or without internet. Wheels found there are used in any case.
# No BuildKit-only syntax (cache or secret mounts): the classic builder must build it too, and without a
# `# syntax=` line BuildKit does not need a registry to fetch a Dockerfile frontend.
ARG BASE_IMAGE=python:3.11-slim

# ------------------------------------------------------------------------------------------------ build stage
# Everything pip needs (the wheelhouse, the sources, pip's own files) stays in this stage; the image keeps the
# virtualenv only. A virtualenv also makes the image the same on bases whose system Python pip must not touch.
FROM ${BASE_IMAGE} AS build
ARG PIP_NO_INDEX=0
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PIP_NO_CACHE_DIR=1 \
    PATH=/opt/venv/bin:$PATH
RUN python3 -m venv /opt/venv
COPY wheelhouse/ /wheelhouse/

# torch first, pinned, from the CPU index: from PyPI the same version is a CUDA build several GB larger, useless
# on a CPU worker. The next install finds torch==2.13.0 (2.13.0+cpu) already there and keeps it.
RUN pip install --find-links /wheelhouse --index-url https://download.pytorch.org/whl/cpu torch==2.13.0

# Whole folders, never single modules: the packages' layout is theirs to change (README.md as a one-file
# wildcard: its absence is no error). The last step fails the build, not the first message, if a dependency
# swapped torch for another build.
COPY pyproject.toml README.m[d] celeryconfig.py /src/
COPY worker /src/worker
COPY producer /src/producer
# The worker and the web app (python -m producer.web) run this image, each with its Prometheus metrics.
RUN pip install --find-links /wheelhouse "/src[worker,web,metrics]" \
    && python -c "import torch; assert torch.__version__ == '2.13.0+cpu' and torch.version.cuda is None, torch.__version__"

# ------------------------------------------------------------------------------------------------ the image
FROM ${BASE_IMAGE}
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PATH=/opt/venv/bin:$PATH
COPY --from=build /opt/venv /opt/venv

# Not root. The model cache lives on a volume: the first start downloads the model (about 1.2 GB for the default),
# every later start reads it from there. ALLINONE_CACHE_DIR keeps GGUF models converted once.
RUN useradd --system --uid 10001 --create-home --home-dir /home/allinone allinone \
    && mkdir -p /models/hf /models/allinone /app \
    && chown -R allinone:allinone /models /app
# Trained sentiment heads (small): ALLINONE_SENTIMENT_HEAD=heads/NAME.safetensors from the working directory;
# trained sentiment adapters (a few MB): ALLINONE_SENTIMENT_ADAPTER=adapters/NAME.safetensors.
COPY heads /app/heads
COPY adapters /app/adapters
ENV HF_HOME=/models/hf \
    ALLINONE_CACHE_DIR=/models/allinone \
    HF_HUB_DISABLE_TELEMETRY=1
VOLUME ["/models"]
USER allinone
WORKDIR /app

# Ready = Redis answers and this container's worker has its model loaded (python -m worker.health).
# The start period covers the first model download.
HEALTHCHECK --interval=30s --timeout=10s --start-period=10m --retries=3 \
    CMD ["python", "-m", "worker.health", "--this-host", "--timeout", "5"]

# SIGTERM is Celery's warm shutdown: the worker takes no new message and finishes the one it holds. Give it
# longer than a reply can take (ALLINONE_REPLY_TIMEOUT_SECONDS, 120 s by default): stop_grace_period in
# docker-compose.yml, --stop-timeout with docker run. A worker killed anyway leaves its message unacknowledged,
# and Redis hands it out again after the visibility timeout.
STOPSIGNAL SIGTERM
CMD ["python", "-m", "worker"]
