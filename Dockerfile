# One image for the API (default command) and the worker (`python manage.py runworker`).
# docker-compose.yml runs PostgreSQL, Redis and NATS as real servers, so only
# requirements/base.txt is installed (stack.txt holds the servers `make run` starts from wheels,
# and psutil for tools/stack.py). tools/ and bench/ stay out of the build context (.dockerignore).
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# For the runbook's `docker exec` commands: procps gives `kill` (SIGUSR1 reloads the worker's
# configuration: `docker exec birb-nest-worker kill -USR1 1`) and `ps`; netcat-openbsd gives
# `nc -zv postgres 5432`.
RUN apt-get update \
    && apt-get install -y --no-install-recommends procps netcat-openbsd \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app

# Dependencies first: this layer is rebuilt only when the pins change.
COPY requirements/base.txt requirements/base.txt
RUN pip install -r requirements/base.txt

# The code belongs to root and is read-only for the service user; only var/ (BIRB_DATA_DIR's
# default: Prometheus multi-process files, static files) is writable.
COPY . .
RUN python -m compileall -q /app \
    && groupadd --system --gid 10001 birb \
    && useradd --system --uid 10001 --gid birb --home-dir /app --no-create-home --shell /usr/sbin/nologin birb \
    && mkdir -p /app/var \
    && chown birb:birb /app/var

USER birb
EXPOSE 8080

# Exec form: the process is PID 1 and receives SIGTERM (worker: finish the batch, drain) and
# SIGUSR1 directly.
CMD ["python", "manage.py", "runapi"]
