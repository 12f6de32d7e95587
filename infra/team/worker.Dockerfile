# SEAP Prefect worker image: the repository with its locked dependency tree (requirements.lock,
# CPU torch), running `prefect worker start --pool seap-process` (a process pool: flow runs are
# subprocesses of this container, working directory /app).
#
#   docker build -f infra/team/worker.Dockerfile -t seap-worker .      # from the repository root
#
# The build context is the repository root; infra/team/worker.Dockerfile.dockerignore keeps the
# virtual environment, git metadata, run outputs and any .env files out of it.
# Configuration (PREFECT_API_URL, MLFLOW_TRACKING_URI) comes from the environment at run time.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TOKENIZERS_PARALLELISM=false \
    PREFECT_SERVER_ANALYTICS_ENABLED=false \
    MLFLOW_DISABLE_TELEMETRY=true \
    HF_HOME=/app/runs/hf

WORKDIR /app

# torch first, from the CPU wheel index (the lock pins the CPU build 2.13.0+cpu; from PyPI pip
# would fetch the multi-GB CUDA build), then the rest of the lock with exact pins.
COPY requirements.lock pyproject.toml ./
RUN pip install --index-url https://download.pytorch.org/whl/cpu "torch==2.13.0+cpu" \
 && grep -v '^torch==' requirements.lock > /tmp/requirements.txt \
 && pip install -r /tmp/requirements.txt \
 && rm /tmp/requirements.txt

COPY . .
RUN pip install --no-deps -e . \
 && useradd --create-home --uid 1000 seap \
 && mkdir -p /app/runs \
 && chown -R seap:seap /app

USER seap
HEALTHCHECK --interval=15s --timeout=5s --start-period=180s --retries=5 \
  CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/health', timeout=4)"
CMD ["prefect", "worker", "start", "--pool", "seap-process", "--with-healthcheck"]
