# The preimage server. Build and run through docker-compose.yml (docs/operations.md):
#   docker-compose --profile gpu up --build --scale preimage=3
#
# Base: Python 3.11 (what the project and CI use). The CUDA runtime and cuDNN come with torch's
# Linux wheels (its nvidia-* dependencies), so a CUDA base image would only add a second copy;
# the NVIDIA container toolkit injects the driver, asked for by the variables below and the GPU
# reservation in docker-compose.yml. Another base (e.g. an nvidia/cuda image that has Python
# 3.11) can be given with --build-arg BASE_IMAGE=...
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    VIRTUAL_ENV=/opt/preimage/venv \
    PATH=/opt/preimage/venv/bin:$PATH

# Dependencies first (a layer that survives code edits), then the code.
WORKDIR /opt/preimage/src
COPY pyproject.toml README.md ./
RUN python -m venv "$VIRTUAL_ENV" \
    && python -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))' \
        > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt
COPY converters/ converters/
COPY service/ service/
RUN pip install --no-deps . && python -m service.rpc.config --table > /dev/null

# An unprivileged user owns the store (a volume) and the exported bundled models. The bundled
# models are exported now, at build time: every replica starts with its own copy instead of
# exporting EfficientNet-Lite0 at start-up.
RUN useradd --system --uid 10001 --create-home --home-dir /home/preimage preimage \
    && mkdir -p /var/lib/preimage/store /opt/preimage/cache \
    && PREIMAGE_CACHE=/opt/preimage/cache preimage models --json > /dev/null \
    && chown -R preimage:preimage /var/lib/preimage /opt/preimage/cache
USER 10001:10001
WORKDIR /home/preimage

# Every setting has a PREIMAGE_* variable (docs/operations.md); these are the container's defaults.
ENV PREIMAGE_ADDRESS=0.0.0.0:50051 \
    PREIMAGE_STORE=/var/lib/preimage/store \
    PREIMAGE_CACHE=/opt/preimage/cache \
    PREIMAGE_METRICS_PORT=9464 \
    PREIMAGE_METRICS_ADDRESS=0.0.0.0 \
    PREIMAGE_SHUTDOWN_GRACE=30
VOLUME ["/var/lib/preimage/store"]
EXPOSE 50051 9464

# grpc.health.v1 over loopback: SERVING, not just an open port. start-period covers importing
# torch, starting the conversion fork server and seeding the store on a first start.
HEALTHCHECK --interval=10s --timeout=8s --start-period=180s --retries=3 \
    CMD ["python", "-m", "service.rpc.healthcheck"]

# SIGTERM drains: health NOT_SERVING, running jobs get PREIMAGE_SHUTDOWN_GRACE seconds.
STOPSIGNAL SIGTERM
ENTRYPOINT ["preimage", "serve"]
