# syntax=docker/dockerfile:1
# pricestream server image: `docker build -t pricestream:0.1.0 .` (or `make image`).
# BASE_IMAGE: a Python 3.11 Debian bookworm image with `python` on the PATH; `make e2e` passes its
# own (debootstrap + Debian's python3) since it has no Docker Hub.
ARG BASE_IMAGE=python:3.11.14-slim-bookworm

# Build stage: install the package and its pinned dependencies into a virtualenv.
FROM ${BASE_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
RUN python -m venv /opt/pricestream
COPY pyproject.toml ./
COPY docs/package.md ./docs/
COPY service ./service
RUN /opt/pricestream/bin/pip install --no-cache-dir .

# Final stage: the virtualenv only; no compilers, no pip cache, a non-root user.
FROM ${BASE_IMAGE}
LABEL org.opencontainers.image.title="pricestream" \
      org.opencontainers.image.description="Live stock prices over gRPC, fanned out from Redis Pub/Sub" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PATH=/opt/pricestream/bin:$PATH \
    PRICESTREAM_GRPC_HOST=[::] \
    PRICESTREAM_HTTP_HOST=0.0.0.0 \
    PRICESTREAM_WEB_HOST=[::]
RUN groupadd --system --gid 10001 pricestream \
    && useradd --system --uid 10001 --gid pricestream --no-create-home --shell /usr/sbin/nologin pricestream
COPY --from=build /opt/pricestream /opt/pricestream
USER 10001:10001
EXPOSE 50051 8080 9464
# Healthy when the gRPC health service answers SERVING for the process (Kubernetes uses its own
# native gRPC probes; this serves `docker run` users). Shell form, so the port follows
# PRICESTREAM_GRPC_PORT as the server does.
HEALTHCHECK --interval=10s --timeout=5s --start-period=10s --retries=3 \
    CMD pricestream health --target "127.0.0.1:${PRICESTREAM_GRPC_PORT:-50051}" --service ""
ENTRYPOINT ["pricestream"]
CMD ["serve"]
