FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    MES_SQLITE_PATH=/data/mes_gateway.db \
    MES_SPOOL_DIR=/data/spool

WORKDIR /app
COPY pyproject.toml README.md ./
COPY capture ./capture
COPY gateway ./gateway
COPY storage ./storage
COPY migrations ./migrations
COPY fake_upstream ./fake_upstream
COPY config ./config
RUN pip install --no-cache-dir ".[otel,queue]" \
    && useradd --system --uid 10001 --home-dir /data --create-home mes

USER mes
VOLUME ["/data"]
EXPOSE 8000
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=30s --timeout=3s CMD python -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2)" || exit 1
CMD ["python", "-m", "gateway"]
