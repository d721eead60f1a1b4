#!/usr/bin/env bash
# Make sure bubblewrap (/usr/bin/bwrap, Debian's package `bubblewrap`) is installed and works, for
# jetci-runner's job sandbox (`--sandbox auto`, the default, and `--sandbox bwrap`).
#
# Installs the package with apt-get when /usr/bin/bwrap is missing, then runs a trivial sandbox
# the way the runner does (new user and PID namespaces), so a host whose kernel refuses user
# namespaces is reported here, at install time, and not as a runner that falls back to no sandbox.
# Exits non-zero with a one-line error if bwrap can be neither installed nor run. Run as root to
# install; the check also works as the runner's user (`sudo -u jetci deploy/install-bubblewrap.sh`).

set -euo pipefail

BWRAP=/usr/bin/bwrap

die() { echo "install-bubblewrap: error: $*" >&2; exit 1; }

if [[ ! -x "$BWRAP" ]]; then
    command -v apt-get >/dev/null 2>&1 || die "$BWRAP is missing and there is no apt-get: install bubblewrap"
    apt-get update -qq || die "apt-get update failed"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap >/dev/null \
        || die "cannot install the bubblewrap package"
fi
[[ -x "$BWRAP" ]] || die "$BWRAP is still missing after installing bubblewrap"

if ! out="$("$BWRAP" --unshare-user --unshare-pid --ro-bind / / --proc /proc -- /bin/true 2>&1)"; then
    die "$BWRAP cannot make a sandbox here ($out); allow unprivileged user namespaces (sysctl kernel.unprivileged_userns_clone=1 or user.max_user_namespaces > 0; in a container, a seccomp profile that allows them)"
fi
echo "install-bubblewrap: $($BWRAP --version) works"
