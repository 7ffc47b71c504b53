# syntax=docker/dockerfile:1
# plm-serve on a CUDA host (NVIDIA driver >= 580 for CUDA 13, and the NVIDIA Container Toolkit):
#   docker build -t plm-serve .
#   docker run --gpus all -p 8000:8000 -v /srv/models:/models:ro plm-serve \
#       --model /models/Perception-LM-1B --config plm-1b
# Everything after the image name is passed to `plm-serve` (`... plm-serve --help` lists the flags); without
# --model the container serves the tiny random-weight demo model. docs/deployment.md has the whole walkthrough.
#
# Two stages. `builder` makes one virtual environment holding exactly requirements/constraints.txt (the versions
# `make test` verified; on PyPI torch 2.14.1 is the CUDA 13.0 build) plus the project as a wheel; the runtime
# stage copies that folder onto the same base, so neither pip's work, the source tree nor build helpers remain.

ARG CUDA_VERSION=13.0.2
ARG UBUNTU_VERSION=24.04
# `base` carries the CUDA runtime and the driver-compatibility check only: torch's wheels bring their own cuBLAS,
# cuDNN and NCCL (pinned in the constraints), so the `runtime` flavour would add gigabytes of second copies.
ARG RUNTIME_FLAVOR=base
# flash-attn compiles CUDA code: build with BUILDER_FLAVOR=devel (nvcc) together with FLASH_ATTN_VERSION.
ARG BUILDER_FLAVOR=base

FROM nvidia/cuda:${CUDA_VERSION}-${BUILDER_FLAVOR}-ubuntu${UBUNTU_VERSION} AS builder
ARG DEBIAN_FRONTEND=noninteractive
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# Ubuntu's archive keeps only the newest build of each package, so an exact apt pin breaks the build at the
# next security update; the base image tag fixes the release, and the Python packages are what is pinned.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src

# Third-party dependencies first, in a layer of their own (a code change does not reinstall torch): the
# project's runtime requirements, each resolved to its pin, wheels only.
COPY requirements/constraints.txt requirements/constraints.txt
COPY pyproject.toml README.md ./
RUN python3 -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))' \
        > /tmp/requirements.txt \
    && pip install --only-binary=:all: -c requirements/constraints.txt -r /tmp/requirements.txt

# Optional flash-attn (the server runs without it). It builds against the installed torch (no build
# isolation) with nvcc; FLASH_ATTN_CUDA_ARCHS=90 compiles for H100/H200 only, which keeps the build short.
# Its build helpers leave again; einops, its one runtime dependency, stays.
ARG FLASH_ATTN_VERSION=""
ARG FLASH_ATTN_CUDA_ARCHS=90
ARG MAX_JOBS=4
RUN if [ -n "${FLASH_ATTN_VERSION}" ]; then \
        command -v nvcc > /dev/null \
            || { echo "FLASH_ATTN_VERSION needs --build-arg BUILDER_FLAVOR=devel (nvcc)" >&2; exit 1; }; \
        pip install wheel==0.48.0 ninja==1.13.2 einops==0.8.2 \
        && FLASH_ATTN_CUDA_ARCHS="${FLASH_ATTN_CUDA_ARCHS}" MAX_JOBS="${MAX_JOBS}" \
            pip install --no-build-isolation "flash-attn==${FLASH_ATTN_VERSION}" \
        && pip uninstall -y wheel ninja; \
    fi

# The project as a regular (non-editable) install, built by the pinned setuptools that torch already needs.
COPY server/ server/
COPY offline/ offline/
COPY engine/ engine/
COPY models/ models/
COPY processors/ processors/
COPY configs/ configs/
RUN pip install --no-deps --no-build-isolation . && pip check


FROM nvidia/cuda:${CUDA_VERSION}-${RUNTIME_FLAVOR}-ubuntu${UBUNTU_VERSION} AS runtime
ARG DEBIAN_FRONTEND=noninteractive
LABEL org.opencontainers.image.title="plm-serve" \
      org.opencontainers.image.description="OpenAI-compatible inference server for Meta's PerceptionLM"
# python3: the interpreter the virtual environment was made with (same base, same package). gcc, libc6-dev and
# libpython3-dev are run-time needs, not build leftovers: Triton compiles a small C launcher that includes
# Python.h the first time each GPU kernel runs. (The DL3008 reason is the one given in the builder stage.)
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 gcc libc6-dev libpython3-dev \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid 10001 plm \
    && useradd --uid 10001 --gid 10001 --create-home --shell /usr/sbin/nologin plm \
    && mkdir /models
COPY --from=builder /opt/venv /opt/venv
# XDG_CACHE_HOME: where the demo checkpoint is built on first use (writable by the server's user).
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 XDG_CACHE_HOME=/home/plm/.cache
USER 10001:10001
WORKDIR /home/plm
# Mount checkpoint folders here (read-only is enough) and pass --model /models/<folder>.
VOLUME ["/models"]
EXPOSE 8000
# /health answers 503 while the model loads (the start period covers large checkpoints), when the engine died,
# and while draining after SIGTERM; urlopen raises on any non-2xx, which marks the container unhealthy.
HEALTHCHECK --interval=15s --timeout=5s --start-period=10m --retries=3 \
    CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]
# The server is PID 1, so `docker stop` (SIGTERM) reaches it directly and starts its drain.
ENTRYPOINT ["plm-serve", "--host", "0.0.0.0", "--port", "8000"]
CMD []
