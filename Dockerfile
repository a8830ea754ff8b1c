# The image every service of docker-compose.yml runs: workers, trainer and Flower.
#
#   docker build -t agent-workers .                                                   # CUDA torch from PyPI
#   docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu -t agent-workers:cpu .
#
# torch is installed first, pinned, in a layer of its own: it is most of the image and changes least often. The
# package's own `torch>=2.4` is then already satisfied, so pip never swaps in another build.
FROM python:3.11-slim

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://pypi.org/simple

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"

WORKDIR /app
COPY pyproject.toml README.md ./
COPY agent_workers ./agent_workers
COPY tasks ./tasks
RUN pip install . && python -c "import tasks, agent_workers" \
    && useradd --system --uid 10001 --no-create-home --home-dir /app agent-workers

# The workers need no privileges (and Celery warns when one runs as root).
USER agent-workers

# The settings come from the environment (AGENT_WORKERS_*; docs/operations.md). With no command, one worker
# process per visible GPU consumes both queues.
CMD ["agent-workers", "worker"]
