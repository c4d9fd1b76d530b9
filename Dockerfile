# The coupon-worker image: one image, one entrypoint; the command picks the role
# (worker, migrate, sandbox, flower, publish, events ...). All configuration comes from
# environment variables (see worker/config.py); the image holds no .env file.
#
# Two stages: the first builds the wheel (the migrations and alembic.ini go inside it, see
# setup.py), the second installs that wheel, not the source tree, the way any host would.

FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml setup.py MANIFEST.in README.md alembic.ini ./
COPY migrations/ ./migrations/
COPY worker/ ./worker/
# The devtools extra (aiohttp, pgserver) and its package: the compose file's `sandbox` service
# runs `coupon-worker sandbox` from this same image. The worker never imports them.
COPY coupon_devtools/ ./coupon_devtools/
RUN pip wheel --no-deps --wheel-dir /wheels .

FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    COUPONS_ENV_FILE=""

RUN groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid app --create-home --home-dir /home/app \
       --shell /usr/sbin/nologin app

COPY --from=build /wheels/ /tmp/wheels/
# The tracing extra too: traces stay off unless configured (docs/tracing.md).
RUN pip install --no-cache-dir "$(ls /tmp/wheels/coupon_worker-*.whl)[devtools,tracing]" \
    && rm -rf /tmp/wheels \
    && python -c "import worker.entrypoints.cli; from worker.adapters.postgres.migrate import alembic_home; alembic_home()"

WORKDIR /home/app
USER app:app

# Prometheus metrics of the worker (COUPONS_METRICS_PORT), the sandbox, Flower.
EXPOSE 9808 8750 5555

ENTRYPOINT ["coupon-worker"]
CMD ["worker"]
