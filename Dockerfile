# One image for every process; docker-compose.yml picks the command.

# The dashboard's one browser dependency (socket.io-client), from the npm registry.
FROM node:20-slim AS dashboard
WORKDIR /web
COPY app/web/package.json app/web/package-lock.json ./
RUN npm ci --no-audit --no-fund

FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /srv/conveyor
COPY pyproject.toml README.md alembic.ini ./
COPY app ./app
COPY workers ./workers
COPY migrations ./migrations
COPY --from=dashboard /web/node_modules ./app/web/node_modules
# The artifact directory is made here, owned by the user, because a new named volume takes the
# ownership of the image's directory it is mounted on (root's, were it missing).
RUN pip install -e . && useradd --system --no-create-home conveyor \
    && mkdir -p /var/lib/conveyor/artifacts && chown -R conveyor /var/lib/conveyor
USER conveyor
EXPOSE 8000
CMD ["gunicorn", "--bind", "0.0.0.0:8000", "--worker-class", "gevent", "--workers", "2", "--worker-connections", "1000", "-c", "python:app.gunicorn_config", "app:create_app()"]
