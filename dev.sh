#!/usr/bin/env bash
# Keelson developer entry point. Run as root on Debian (bookworm); installs whatever is missing.
#   ./dev.sh local            run one agent on the local engine (a private dockerd is started if none answers)
#   ./dev.sh test [ARGS]      ruff, mypy, import-linter and the whole pytest suite (ARGS go to pytest)
#   ./dev.sh swarm up|down    a real 3-node Swarm in network namespaces, with an agent per node
#   ./dev.sh swarm deploy     the agent image as a global stack (docker-compose.swarm.yml) on that Swarm
#   ./dev.sh image            build the agent image offline (local Debian base); saved in .local/image/
#   ./dev.sh bench            the benchmark suite (results in bench/results/)
set -euo pipefail
cd "$(dirname "$0")"
REPO=$(pwd)
VENV="$REPO/.venv"
PY="$VENV/bin/python"

# Debian packages the agent, its tests and benchmarks need.
APT_BASE=(python3 python3-venv python3-pip docker.io busybox-static serf iproute2 iptables util-linux
          openssh-server openssh-client curl ca-certificates)
APT_TEST=(chromium chromium-driver)
APT_BENCH=(haproxy hey)
APT_IMAGE=(debootstrap)

log() { printf '[dev.sh] %s\n' "$*" >&2; }
LOCAL_PIDS=()

need_root() {
    if [ "$(id -u)" != 0 ]; then
        log "run as root: the tests build network namespaces and start dockerd"
        exit 1
    fi
}

ensure_apt() {
    local missing=()
    for pkg in "$@"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    log "installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

python_bin() {
    # The newest python3 on PATH that is 3.11 or later.
    for cand in python3.13 python3.12 python3.11 python3; do
        if command -v "$cand" >/dev/null 2>&1 && \
           "$cand" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' 2>/dev/null; then
            command -v "$cand"; return 0
        fi
    done
    log "Python 3.11 or later is required"; exit 1
}

ensure_venv() {
    local stamp="$VENV/.keelson-installed" want
    want=$(sha256sum pyproject.toml | cut -d' ' -f1)
    if [ ! -x "$PY" ]; then
        log "creating the virtual environment in .venv"
        "$(python_bin)" -m venv "$VENV"
    fi
    if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
        log "installing Python dependencies"
        "$PY" -m pip install -q --upgrade pip >/dev/null
        "$PY" -m pip install -q -e ".[dev]"
        echo "$want" > "$stamp"
    fi
}

ensure_compose() {
    # Edge stacks run Docker Compose v2; bookworm has only v1, so it comes from Debian trixie (tools/debs.py).
    local have
    have=$(docker-compose version --short 2>/dev/null || true)
    case "$have" in
        2.*|v2.*) return 0 ;;
    esac
    log "installing Docker Compose v2 (Debian trixie's docker-compose; found: ${have:-none})"
    "$PY" -m tools.debs install docker-compose
}

engine_answers() {
    local host=${1:-}
    if [ -n "$host" ]; then docker -H "$host" version >/dev/null 2>&1; else docker version >/dev/null 2>&1; fi
}

cmd_local() {
    need_root
    ensure_apt "${APT_BASE[@]}"
    ensure_venv
    ensure_compose
    mkdir -p .local
    # The agent and the private engine are ours: whatever ends this script (Ctrl-C, SIGTERM, an error)
    # stops them by PID (tools.dockerd removes its engine, namespace and mounts on SIGTERM).
    LOCAL_PIDS=()
    trap 'stop_local' EXIT
    trap 'stop_local; exit 130' INT TERM
    if ! engine_answers "${DOCKER_HOST:-}"; then
        log "no Docker engine answers: starting a private dockerd in .local/dockerd"
        "$PY" -m tools.dockerd .local/dockerd > .local/dockerd.out 2>&1 &
        local engine_pid=$!
        LOCAL_PIDS+=("$engine_pid")
        for _ in $(seq 1 120); do
            [ -s .local/dockerd.out ] && break
            kill -0 "$engine_pid" 2>/dev/null || { cat .local/dockerd.out >&2; exit 1; }
            sleep 0.5
        done
        export DOCKER_HOST
        DOCKER_HOST=$(head -n1 .local/dockerd.out)
    fi
    "$PY" -m tools.signer .local/docker-config >/dev/null
    local port=${AGENT_PORT:-9001}
    export DATA_PATH=${DATA_PATH:-$REPO/.local/data}
    mkdir -p "$DATA_PATH"
    log "engine: ${DOCKER_HOST:-unix:///var/run/docker.sock}"
    log "try:    DOCKER_CERT_PATH=$REPO/.local/docker-config docker --config $REPO/.local/docker-config --tls -H tcp://127.0.0.1:$port ps"
    "$PY" -m agent &
    local agent_pid=$!
    LOCAL_PIDS=("$agent_pid" "${LOCAL_PIDS[@]}")
    local rc=0
    wait "$agent_pid" || rc=$?
    return "$rc"
}

stop_local() {
    local pid
    for pid in "${LOCAL_PIDS[@]}"; do
        kill "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    LOCAL_PIDS=()
}

cmd_test() {
    need_root
    ensure_apt "${APT_BASE[@]}" "${APT_TEST[@]}" "${APT_IMAGE[@]}"
    ensure_venv
    ensure_compose
    log "ruff"
    "$VENV/bin/ruff" check .
    log "mypy"
    "$VENV/bin/mypy"
    log "import-linter (layers, pyproject.toml [tool.importlinter])"
    "$VENV/bin/lint-imports"
    log "pytest"
    local rc=0
    "$PY" -m pytest -q -p no:cacheprovider "$@" || rc=$?
    [ "$rc" = 5 ] && { log "pytest collected no tests"; rc=1; }
    return "$rc"
}

cmd_swarm() {
    need_root
    ensure_apt "${APT_BASE[@]}"
    ensure_venv
    ensure_compose
    local sub=${1:-}; shift || true
    case "$sub" in
        up) "$PY" -m tools.swarm up --agents --state-dir .swarm "$@" ;;
        down) "$PY" -m tools.swarm down --state-dir .swarm "$@" ;;
        deploy) ensure_apt "${APT_IMAGE[@]}"; "$PY" -m tools.deploy --state-dir .swarm "$@" ;;
        *) log "usage: ./dev.sh swarm up|down|deploy"; exit 2 ;;
    esac
}

cmd_image() {
    need_root
    ensure_apt "${APT_BASE[@]}" "${APT_IMAGE[@]}"
    ensure_venv
    "$PY" -m tools.image "$@"
}

cmd_bench() {
    need_root
    ensure_apt "${APT_BASE[@]}" "${APT_BENCH[@]}"
    ensure_venv
    "$PY" -m bench "$@"
}

case "${1:-}" in
    local) shift; cmd_local "$@" ;;
    test) shift; cmd_test "$@" ;;
    swarm) shift; cmd_swarm "$@" ;;
    image) shift; cmd_image "$@" ;;
    bench) shift; cmd_bench "$@" ;;
    *) sed -n '2,8p' "$0"; exit 2 ;;
esac
