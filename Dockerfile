# specdec images: one package, three services (gateway, oracle, draft).
#
#   docker build --target cpu  -t specdec:cpu  .   # python:3.12-slim + CPU-only torch:
#                                                  #   gateway, drafts, a CPU oracle
#   docker build --target cuda -t specdec:cuda .   # PyTorch CUDA runtime: the GPU oracle
#
# The service is the command: `docker run specdec:cpu draft`, `... specdec:cuda oracle`.
# Configuration is SPECDEC_* environment variables (see `specdec <service> --help`).
# Without --target the build gives the cpu image (the last stage).
# HEALTHCHECK_PORT picks the port the image's HEALTHCHECK probes:
#   gateway 50051 (default), oracle 50052, draft 50053 (its local health server).
# The CPU torch wheel comes from the PyTorch CPU index (TORCH_INDEX_URL); set it to a
# mirror, or to https://pypi.org/simple to take PyPI's (CUDA-enabled, larger) wheel.

ARG PYTHON_IMAGE=python:3.12-slim
ARG CUDA_IMAGE=pytorch/pytorch:2.9.1-cuda12.8-cudnn9-runtime

# ---- wheel: build the specdec wheel once; both runtimes install it ----------------
FROM ${PYTHON_IMAGE} AS wheel
WORKDIR /src
# .dockerignore lets through only what the wheel is built from.
COPY . .
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

# ---- cuda: the oracle on an NVIDIA GPU (torch comes with the base image) -----------
FROM ${CUDA_IMAGE} AS cuda
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HOME=/home/specdec \
    HF_HOME=/home/specdec/.cache/huggingface \
    HEALTHCHECK_PORT=50052
RUN --mount=type=bind,from=wheel,source=/wheels,target=/wheels \
    pip install /wheels/*.whl
RUN groupadd --system --gid 10001 specdec \
 && useradd --system --uid 10001 --gid 10001 --home-dir /home/specdec --create-home specdec \
 && mkdir -p /home/specdec/.cache/huggingface /models \
 && chown -R 10001:10001 /home/specdec
USER 10001:10001
WORKDIR /home/specdec
EXPOSE 50052 9464
HEALTHCHECK --interval=15s --timeout=5s --start-period=300s --retries=3 \
    CMD specdec healthcheck "localhost:${HEALTHCHECK_PORT}" || exit 1
ENTRYPOINT ["specdec"]
CMD ["oracle"]

# ---- cpu: gateway, drafts, and an oracle on hosts without a GPU --------------------
FROM ${PYTHON_IMAGE} AS cpu
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_SPEC=torch
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HOME=/home/specdec \
    HF_HOME=/home/specdec/.cache/huggingface \
    HEALTHCHECK_PORT=50051
# torch first, from the CPU index, so that installing specdec finds it satisfied
# instead of pulling PyPI's CUDA build (several GB).
RUN pip install --index-url "${TORCH_INDEX_URL}" "${TORCH_SPEC}"
RUN --mount=type=bind,from=wheel,source=/wheels,target=/wheels \
    pip install /wheels/*.whl
# A fixed numeric UID, so Kubernetes' runAsNonRoot can verify it without a passwd lookup.
RUN groupadd --system --gid 10001 specdec \
 && useradd --system --uid 10001 --gid 10001 --home-dir /home/specdec --create-home specdec \
 && mkdir -p /home/specdec/.cache/huggingface /models \
 && chown -R 10001:10001 /home/specdec
USER 10001:10001
WORKDIR /home/specdec
EXPOSE 50051 50052 9464 9465 9466
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD specdec healthcheck "localhost:${HEALTHCHECK_PORT}" || exit 1
ENTRYPOINT ["specdec"]
CMD ["gateway"]
