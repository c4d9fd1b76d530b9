# The coupon-worker image: one image, one entrypoint; the command picks the role
# (worker, migrate, sandbox, flower, publish, events ...). All configuration comes from
# environment variables (see worker/config.py); the image holds no .env file.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    COUPONS_ENV_FILE=""

RUN groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid app --create-home --home-dir /home/app \
       --shell /usr/sbin/nologin app

# `coupon-worker migrate` finds alembic.ini and migrations/ next to the worker package
# (worker/ledger/migrate.py: Path(__file__).parents[2]), so the package is installed in
# editable mode from /app and the three stay side by side.
WORKDIR /app
COPY pyproject.toml README.md alembic.ini ./
COPY migrations/ ./migrations/
COPY worker/ ./worker/
# The devtools extra (aiohttp, pgserver) and its package: the compose file's `sandbox` service
# runs `coupon-worker sandbox` from this same image. The worker never imports them.
COPY coupon_devtools/ ./coupon_devtools/
RUN pip install --no-cache-dir -e ".[devtools]" \
    && python -c "import worker.cli" \
    && chmod -R a+rX /app

USER app:app

# Prometheus metrics of the worker (COUPONS_METRICS_PORT), the sandbox, Flower.
EXPOSE 9808 8750 5555

ENTRYPOINT ["coupon-worker"]
CMD ["worker"]
