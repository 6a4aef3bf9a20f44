# tfdeploy service image (API or worker). Multi-stage: dependencies are built into a venv in
# the first stage; the final stage holds only Python, that venv and the code.
FROM python:3.11-slim AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY requirements.lock pyproject.toml README.md ./
COPY service ./service
COPY migrations ./migrations
# The project's runtime dependencies, at the versions of the lock file; pgserver (the embedded
# PostgreSQL for laptops) is not needed where TFDEPLOY_DATABASE_URL is set.
RUN python -m venv /venv \
 && /venv/bin/pip install -c requirements.lock . \
 && /venv/bin/pip uninstall -y pgserver \
 && find /venv -name '__pycache__' -prune -exec rm -rf {} + \
 && rm -rf /venv/lib/python3.11/site-packages/pip /venv/lib/python3.11/site-packages/setuptools

FROM python:3.11-slim
RUN useradd --system --uid 10001 --home /data tfdeploy && mkdir -p /data && chown tfdeploy /data
COPY --from=build /venv /venv
COPY --from=build /src/migrations /app/migrations
ENV PATH=/venv/bin:$PATH TFDEPLOY_DATA_DIR=/data TFDEPLOY_MIGRATIONS_DIR=/app/migrations \
    TFDEPLOY_HOST=0.0.0.0 PYTHONUNBUFFERED=1
USER tfdeploy
EXPOSE 8000
ENTRYPOINT ["tfdeploy"]
CMD ["serve"]
