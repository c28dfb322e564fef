#!/usr/bin/env bash
# Start a podman service that speaks the Docker Engine API, for the container tests and benches.
#
#   bash scripts/podman-up.sh          # prints DOCKER_HOST=unix:///.../podman.sock when it answers
#   bash scripts/podman-up.sh --stop   # stops the service this script started
#
# There is no Docker daemon on these machines; podman serves the same API. What works here (and why):
#   - runtime runc: crun fails on this machine's mix of cgroup v1 controllers and a v2 mount;
#   - cgroup_manager cgroupfs: there is no systemd to ask for cgroups;
#   - explicit ulimits: podman's default nofile is above this machine's hard limit, so containers fail to start;
#   - a local busybox image imported from a rootfs tar: no registry is reachable (and none is needed).
# Idempotent: a service that already answers is reused; the image is imported only when missing.
# Without root (a developer's laptop) it says why and exits 0: the container tests then skip with that reason
# (under CI=true they fail instead, see tests/conftest.py).
set -euo pipefail

DIR=${FEDML_PODMAN_DIR:-/tmp/fedml-podman}
SOCK="$DIR/podman.sock"
IMAGE=${FEDML_TEST_IMAGE:-localhost/fedml-busybox:latest}
export CONTAINERS_CONF="$DIR/containers.conf"

say() { echo "podman-up: $*" >&2; }

answers() {
    [ -S "$SOCK" ] && curl -fsS --max-time 2 --unix-socket "$SOCK" http://d/_ping >/dev/null 2>&1
}

if [ "${1:-}" = "--stop" ]; then
    if [ -f "$DIR/service.pid" ]; then
        kill "$(cat "$DIR/service.pid")" 2>/dev/null || true
        rm -f "$DIR/service.pid" "$SOCK"
        say "stopped"
    fi
    exit 0
fi

if ! command -v podman >/dev/null || ! command -v runc >/dev/null || ! command -v busybox >/dev/null \
        || ! command -v curl >/dev/null; then
    if [ "$(id -u)" != 0 ]; then
        say "podman, runc, busybox-static or curl is missing and installing them needs root; container tests will skip"
        exit 0
    fi
    say "installing podman runc busybox-static curl"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq podman runc busybox-static curl >/dev/null
fi
if [ "$(id -u)" != 0 ]; then
    say "rootless podman is not set up by this script (it needs root here); container tests will skip"
    exit 0
fi

mkdir -p "$DIR"
hard=$(ulimit -Hn)
[ "$hard" = unlimited ] && hard=1048576
nofile=$(( hard < 65536 ? hard : 65536 ))
cat >"$CONTAINERS_CONF.tmp" <<EOF
[containers]
default_ulimits = ["nofile=$nofile:$nofile", "nproc=32768:32768"]
log_driver = "k8s-file"

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
EOF
mv "$CONTAINERS_CONF.tmp" "$CONTAINERS_CONF"

if ! answers; then
    rm -f "$SOCK"
    # setsid: the service outlives this script and the make that ran it; --time=0: it never idles out.
    setsid podman system service --time=0 "unix://$SOCK" >"$DIR/service.log" 2>&1 </dev/null &
    echo $! >"$DIR/service.pid"
    for _ in $(seq 1 100); do
        answers && break
        sleep 0.1
    done
    if ! answers; then
        say "the podman service did not answer at $SOCK; its log:"
        tail -20 "$DIR/service.log" >&2 || true
        exit 1
    fi
fi

if ! podman image exists "$IMAGE"; then
    # A busybox root filesystem: /bin/sh and the usual tools. /lib, /lib64 point into /usr so that a job
    # that mounts the host's /usr (read-only) can run the host's dynamically linked programs, python3 included.
    root=$(mktemp -d)
    trap 'rm -rf "$root"' EXIT
    mkdir -p "$root"/{bin,usr/bin,usr/lib,usr/lib64,etc,tmp,proc,sys,dev,root,home,run}
    chmod 1777 "$root/tmp"
    cp "$(command -v busybox)" "$root/bin/busybox"
    for app in $(busybox --list); do
        [ -e "$root/bin/$app" ] || ln -s busybox "$root/bin/$app"
    done
    ln -s usr/lib "$root/lib"
    ln -s usr/lib64 "$root/lib64"
    echo "root:x:0:0:root:/root:/bin/sh" >"$root/etc/passwd"
    echo "root:x:0:" >"$root/etc/group"
    tar -C "$root" -cf "$root.tar" .
    podman import -q --change 'CMD ["/bin/sh"]' \
        --change 'ENV PATH=/usr/local/bin:/usr/bin:/bin' "$root.tar" "$IMAGE" >/dev/null
    rm -f "$root.tar"
    say "imported $IMAGE"
fi

echo "DOCKER_HOST=unix://$SOCK"
