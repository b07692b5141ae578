# syntax=docker/dockerfile:1
# One image for both components; the Helm chart picks the entry point:
#   operator: perseus-operator        sidecar: perseus-sidecar        CLI: perseus
# Build:  docker build -t perseus-k8s:0.1.0 .
# The base image is pinned to the exact Python version CI proves the install with
# (scripts/image-install-check.sh runs the same install step in a clean venv).
# BASE_IMAGE: any Debian-based image with python3 (>= 3.11, with venv) on PATH; scripts/image.sh
# passes one made locally with debootstrap, for clusters without a registry.
ARG PYTHON_VERSION=3.11.7
ARG DEBIAN_RELEASE=bookworm
ARG BASE_IMAGE=python:${PYTHON_VERSION}-slim-${DEBIAN_RELEASE}

FROM ${BASE_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
# Only what the distribution needs (pyproject.toml names README.md as its readme).
COPY pyproject.toml README.md ./
COPY operator ./operator
COPY sidecar ./sidecar
COPY profiles ./profiles
COPY sim ./sim
COPY hooks ./hooks
COPY scripts/image-install.sh ./scripts/image-install.sh
RUN scripts/image-install.sh /src /opt/perseus

FROM ${BASE_IMAGE} AS runtime
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="perseus-k8s" \
      org.opencontainers.image.description="Perseus on Kubernetes: operator and per-node GPU clock sidecar" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"
# No bytecode writes at run time: the chart mounts the root filesystem read-only.
ENV PATH=/opt/perseus/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
COPY --from=build /opt/perseus /opt/perseus
# A numeric non-root user, so Kubernetes can verify runAsNonRoot. The sidecar overrides it with
# runAsUser 0 in the chart: NVML's clock locking needs CAP_SYS_ADMIN in the effective set.
RUN groupadd --system --gid 10001 perseus \
 && useradd --system --uid 10001 --gid 10001 --home-dir /nonexistent --no-create-home \
      --shell /usr/sbin/nologin perseus
USER 10001:10001
WORKDIR /tmp
CMD ["perseus-operator"]
