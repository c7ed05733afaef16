#!/usr/bin/env bash
# Build the ZEDA image on a CPU host and run it for real: docker run, docker stop drain, config errors,
# docker-compose with a locust A/B report (tests/test_docker_run.py, marked `docker`).
#
#   sudo docker/smoke.sh            # or: make docker-smoke
#   sudo docker/smoke.sh -k drain   # arguments go to pytest
#
# Installs what it lacks (docker.io, debootstrap, docker-compose: Debian packages), starts dockerd unless one
# runs (--bridge=none; every build and container uses the host network, the server listens on loopback only)
# and stops it again at the end. No registry is needed: the base image is Debian bookworm minbase with
# python3.11 (debootstrap + docker import, cached as an image), and pip installs from a wheelhouse the host's
# pip fills (cached) and serves on loopback. Settings (environment):
#   ZEDA_SMOKE_STATE   state directory: dockerd log, wheelhouse, reports (default /var/tmp/zeda-docker)
#   ZEDA_BASE_IMAGE    local base image (default zeda-base:bookworm-py311)
#   ZEDA_IMAGE         image built and tested (default zeda:cpu)
#   ZEDA_EXTRAS        extras (default loadtest; sglang,loadtest adds SGLang, about 11 GB)
#   ZEDA_TORCH_SPEC    torch requirement of the image (default torch==2.13.0+cpu, the CPU build on this disk;
#                      empty: pyproject's pin, torch 2.14.1, which the sglang extra needs: the CUDA build, GBs)
#   ZEDA_WITHOUT       requirements left out (default triton: CUDA kernels only, 1 GB; empty keeps it)
#   DEBIAN_MIRROR      debootstrap mirror (default: the first deb.debian.org-style URI of this host's apt sources)
#   VENV               the project's venv that runs pytest (default .venv, as `make` builds it)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
STATE=${ZEDA_SMOKE_STATE:-/var/tmp/zeda-docker}
BASE_IMAGE=${ZEDA_BASE_IMAGE:-zeda-base:bookworm-py311}
IMAGE=${ZEDA_IMAGE:-zeda:cpu}
EXTRAS=${ZEDA_EXTRAS:-loadtest}
TORCH_SPEC=${ZEDA_TORCH_SPEC-torch==2.13.0+cpu}
WITHOUT=${ZEDA_WITHOUT-triton}
VENV=${VENV:-$ROOT/.venv}
[[ $VENV == /* ]] || VENV=$PWD/$VENV
SUITE=bookworm
# Debian's docker client: it matches Debian's dockerd and has the classic builder (a newer client elsewhere on
# PATH would want buildx).
export PATH=/usr/sbin:/usr/bin:$PATH
export DOCKER_BUILDKIT=0

START=$(date +%s)
step() { printf '\n== [%4ss] %s\n' "$(($(date +%s) - START))" "$*"; }
die() {
    echo "smoke: $*" >&2
    exit 1
}

[[ $(id -u) == 0 ]] || die "run as root (it installs packages and starts dockerd)"
[[ -x $VENV/bin/python ]] || die "no project venv at $VENV (make test builds it)"
mkdir -p "$STATE"

DOCKERD_PID=""
SERVE_PID=""
# shellcheck disable=SC2317  # run by the EXIT trap
cleanup() {
    local rc=$?
    if [[ -n $SERVE_PID ]]; then kill "$SERVE_PID" 2>/dev/null || true; fi
    if [[ -n $DOCKERD_PID ]]; then
        step "stopping dockerd ($DOCKERD_PID)"
        kill "$DOCKERD_PID" 2>/dev/null || true
        for _ in $(seq 60); do kill -0 "$DOCKERD_PID" 2>/dev/null || break; sleep 1; done
    fi
    step "done (exit $rc)"
    exit "$rc"
}
trap cleanup EXIT

# All in a function: bash reads it whole before running it (an edit meanwhile cannot derail a run).
main() {
    step "packages"
    missing=()
    command -v dockerd >/dev/null || missing+=(docker.io)
    command -v debootstrap >/dev/null || missing+=(debootstrap)
    command -v docker-compose >/dev/null || missing+=(docker-compose)
    if ((${#missing[@]})); then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
    docker --version
    docker-compose --version

    step "dockerd"
    if docker info >/dev/null 2>&1; then
        echo "a dockerd already runs: using it (and leaving it running)"
    else
        dockerd --bridge=none --iptables=false --ip6tables=false --storage-driver=overlay2 \
            >"$STATE/dockerd.log" 2>&1 &
        DOCKERD_PID=$!
        for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
        docker info >/dev/null 2>&1 || die "dockerd did not start: see $STATE/dockerd.log"
        echo "dockerd $DOCKERD_PID, log $STATE/dockerd.log"
    fi

    step "base image $BASE_IMAGE"
    if docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
        echo "cached"
    else
        mirror=${DEBIAN_MIRROR:-$(grep -rhoE '(URIs:|deb) +https?://[^ ]+/debian/?( |$)' /etc/apt/sources.list* 2>/dev/null \
            | awk '{print $2}' | head -n1)}
        mirror=${mirror:-http://deb.debian.org/debian}
        rootfs="$STATE/rootfs"
        rm -rf "$rootfs"
        debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
            "$SUITE" "$rootfs" "$mirror" >"$STATE/debootstrap.log" 2>&1 \
            || die "debootstrap failed: see $STATE/debootstrap.log"
        chroot "$rootfs" apt-get clean
        rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/*
        tar -C "$rootfs" --numeric-owner -c . \
            | docker import --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]' - "$BASE_IMAGE" >/dev/null
        rm -rf "$rootfs"
    fi
    docker run --rm --network host "$BASE_IMAGE" python3 --version

    step "wheelhouse ($EXTRAS, $TORCH_SPEC)"
    wheels="$STATE/wheels"
    mkdir -p "$wheels"
    requirements="$STATE/requirements.txt"
    {
        echo "setuptools>=69"
        echo "wheel"
        if [[ -n $TORCH_SPEC ]]; then
            echo "$TORCH_SPEC"
            python3 "$ROOT/docker/requirements.py" --extras "$EXTRAS" --without "torch,$WITHOUT"
        else  # the pins as they are (torch==2.14.1, the CUDA build; ZEDA_WITHOUT does not apply)
            python3 "$ROOT/docker/requirements.py" --extras "$EXTRAS"
        fi
    } >"$requirements"
    # The host's pip: its configuration (local indexes, find-links, constraints) is how `make` finds torch too.
    python3 -m pip wheel --quiet --wheel-dir "$wheels" --find-links "$wheels" -r "$requirements" \
        2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
    du -sh "$wheels"

    step "image $IMAGE"
    port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    python3 -m http.server --bind 127.0.0.1 --directory "$wheels" "$port" >"$STATE/wheelhouse.log" 2>&1 &
    SERVE_PID=$!
    build_start=$(date +%s)
    docker build --network host -t "$IMAGE" \
        --build-arg SGLANG_IMAGE="$BASE_IMAGE" \
        --build-arg ZEDA_EXTRAS="$EXTRAS" \
        --build-arg ZEDA_DEVICE=cpu \
        --build-arg TORCH_SPEC="$TORCH_SPEC" \
        --build-arg ZEDA_WITHOUT="$WITHOUT" \
        --build-arg PIP_NO_INDEX=1 \
        --build-arg PIP_FIND_LINKS="http://127.0.0.1:$port/" \
        "$ROOT"
    kill "$SERVE_PID"
    SERVE_PID=""
    size=$(docker image inspect -f '{{.Size}}' "$IMAGE")
    echo "image $IMAGE: $((size / 1000000)) MB, built in $(($(date +%s) - build_start)) s"
    docker image ls "$IMAGE"

    step "tests (pytest -m docker)"
    cd "$ROOT"
    ZEDA_DOCKER_IMAGE="$IMAGE" ZEDA_SMOKE_STATE="$STATE" "$VENV/bin/python" -m pytest -m docker -v -p no:cacheprovider \
        tests/test_docker_run.py "$@"
}

main "$@"; exit
