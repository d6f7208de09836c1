# syntax=docker/dockerfile:1
# modelscope-router: the gateway image.
#   docker build -t modelscope-router .
#   docker run -p 8080:8080 -v "$PWD/config/router.yaml:/app/config/router.yaml:ro" \
#     -v router-data:/app/data --env-file .env modelscope-router
# With the default store (SQLite, relative path) the counters land in /app/data, a volume, so a
# restart or a new container keeps the day's counts. docker-compose.yml runs two replicas on Redis.

ARG PYTHON_IMAGE=python:3.11-slim

# ---- builder: install the package (no dev extras) into a self-contained venv ----
FROM ${PYTHON_IMAGE} AS builder
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY pyproject.toml README.md ./
COPY router ./router
RUN pip install . \
 && modelscope-router --help >/dev/null

# ---- runtime: the venv only; no compiler, no sources, no pip cache ----
FROM ${PYTHON_IMAGE}
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH \
    ROUTER_SERVER__HOST=0.0.0.0 \
    ROUTER_SERVER__PORT=8080
RUN groupadd --system --gid 10001 router \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /app/data \
      --shell /usr/sbin/nologin router \
 && mkdir -p /app/config /app/data \
 && chown 10001:10001 /app/data
COPY --from=builder /opt/venv /opt/venv
# The working directory is the data volume: the default store URL
# (sqlite:///modelscope-router.sqlite3) is relative, so it resolves to /app/data.
WORKDIR /app/data
VOLUME ["/app/data"]
USER 10001:10001
EXPOSE 8080
# python, not curl: the slim image has no curl. The port follows ROUTER_SERVER__PORT.
HEALTHCHECK --interval=15s --timeout=5s --start-period=15s --retries=3 \
  CMD ["python", "-c", "import os, sys, urllib.request; port = os.environ.get('ROUTER_SERVER__PORT', '8080'); sys.exit(0 if urllib.request.urlopen(f'http://127.0.0.1:{port}/healthz', timeout=4).status == 200 else 1)"]
ENTRYPOINT ["modelscope-router"]
CMD ["serve", "--config", "/app/config/router.yaml"]
