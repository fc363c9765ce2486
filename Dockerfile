# Keelson agent image.
#   docker build -t keelson/agent:latest .                         (PyPI and Debian reachable from RUN steps)
#   ./dev.sh image                                                  (no registry, no network: see tools/image.py)
# The second passes BASE=keelson-base:bookworm (debootstrap of bookworm, python3 + python3-venv) and OFFLINE=1:
# then RUN steps use only deploy/wheelhouse (wheels/ for pip, debs/ for apt), filled on the host beforehand.
ARG BASE=python:3.11-slim-bookworm

# ---------------------------------------------------------------- build: a virtualenv with the agent installed
FROM ${BASE} AS build
ARG OFFLINE=0
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
COPY deploy/wheelhouse/ /wheelhouse/
COPY pyproject.toml README.md /src/
COPY agent/ /src/agent/
COPY proxy/ /src/proxy/
COPY browse/ /src/browse/
COPY edge/ /src/edge/
RUN set -eu; \
    if [ "$OFFLINE" = 1 ]; then set -- --no-index --find-links /wheelhouse/wheels; else set --; fi; \
    python3 -m venv /opt/keelson; \
    /opt/keelson/bin/pip install "$@" /src; \
    /opt/keelson/bin/pip uninstall -y -q pip setuptools; \
    mkdir -p /debs; \
    if [ "$OFFLINE" = 1 ]; then cp /wheelhouse/debs/*.deb /debs/; fi

# ---------------------------------------------------------------- runtime: the base, serf, the virtualenv
# Edge stacks need Docker Compose v2 and the Docker CLI (`docker stack deploy`): bookworm packages only Compose
# v1, so both come from Debian trixie (static Go builds; bookworm's libc suffices). See tools/debs.py.
FROM ${BASE}
ARG OFFLINE=0
ARG DEBIAN_FRONTEND=noninteractive
COPY --from=build /debs/ /tmp/debs/
# policy-rc.d: serf's maintainer scripts must not try to start a serf service inside the build.
RUN set -eu; \
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d; \
    if [ "$OFFLINE" = 1 ]; then \
        apt-get install -y --no-install-recommends /tmp/debs/*.deb; \
    else \
        echo 'deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian trixie main' \
            > /etc/apt/sources.list.d/trixie.list; \
        apt-get update; \
        apt-get install -y --no-install-recommends -o APT::Default-Release=bookworm serf docker-compose/trixie docker-cli/trixie; \
        rm /etc/apt/sources.list.d/trixie.list; \
    fi; \
    rm -rf /usr/sbin/policy-rc.d /tmp/debs /var/lib/apt/lists/* /var/cache/apt/*.bin /var/cache/apt/archives/*.deb; \
    serf version; docker-compose version; docker --version; \
    mkdir -p /data
COPY --from=build /opt/keelson /opt/keelson
COPY deploy/healthcheck.py /opt/keelson/healthcheck.py
ENV PATH=/opt/keelson/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
WORKDIR /opt/keelson
EXPOSE 9001
# The first check runs `interval` after start; Swarm counts a task as running only once it is healthy.
HEALTHCHECK --interval=10s --timeout=6s --start-period=30s --retries=3 \
    CMD ["/opt/keelson/bin/python", "/opt/keelson/healthcheck.py"]
ENTRYPOINT ["/opt/keelson/bin/python", "-m", "agent"]
