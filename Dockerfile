# tfdeploy service image (API or worker). Builds with no network: every Python package comes
# from wheels/, a wheelhouse made on the host, and the base is a build argument. Use
# scripts/build-image.sh, which makes the wheelhouse (and, where no registry answers, a base
# with debootstrap) and runs `docker build --network none`.
ARG BASE=python:3.11-slim

# The dependencies: wheels/requirements.txt is the service section of requirements.lock. pip
# runs from its own wheel, so the base needs no ensurepip (Debian's python3 alone will do) and
# the venv gets no pip. No bytecode (25 MB; a process starts ~0.5 s slower), no stubs or sources
# of compiled extensions. botocore carries the models of every AWS service (28 MB): the S3 state
# store needs S3's, and boto3's credential providers STS's, SSO's and sign-in's.
FROM ${BASE} AS deps
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PIP_NO_INDEX=1 PIP_FIND_LINKS=/wheels \
    PIP_ROOT_USER_ACTION=ignore
COPY wheels /wheels
RUN python3 -m venv --without-pip /venv \
 && /venv/bin/python "$(echo /wheels/pip-*.whl)/pip" install --no-deps --no-compile -r /wheels/requirements.txt \
 && find /venv \( -name '*.pyx' -o -name '*.pxd' -o -name '*.pyi' -o -name '*.c' -o -name '*.h' \) -delete \
 && cd /venv/lib/python3.11/site-packages/botocore/data \
 && for d in */; do case "${d%/}" in s3|sts|sso|sso-oidc|signin) ;; *) rm -rf "$d" ;; esac; done

# The project, built with the wheelhouse's setuptools into /app-root (merged into /venv below, so
# a code change makes a small layer); every module of it must import.
FROM deps AS app
COPY pyproject.toml README.md /src/
COPY service /src/service
RUN /venv/bin/python "$(echo /wheels/pip-*.whl)/pip" install --no-deps --no-compile --root /app-root /src \
 && cd / && PYTHONDONTWRITEBYTECODE=1 PYTHONPATH=/app-root/venv/lib/python3.11/site-packages \
    /venv/bin/python -c "import importlib, pkgutil, service; \
[importlib.import_module(m.name) for m in pkgutil.walk_packages(service.__path__, 'service.')]"

FROM ${BASE}
RUN useradd --system --uid 10001 --home /data tfdeploy && mkdir -p /data && chown tfdeploy /data
COPY --from=deps /venv /venv
COPY --from=app /app-root/venv /venv
COPY migrations /app/migrations
ENV PATH=/venv/bin:$PATH TFDEPLOY_DATA_DIR=/data TFDEPLOY_MIGRATIONS_DIR=/app/migrations \
    TFDEPLOY_HOST=0.0.0.0 PYTHONUNBUFFERED=1
USER tfdeploy
EXPOSE 8000
ENTRYPOINT ["tfdeploy"]
CMD ["serve"]
