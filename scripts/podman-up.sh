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
#   - a local busybox image imported from a rootfs tar: no outside registry is reachable (and none is needed);
#   - a registry of our own on loopback (Debian's docker-registry, htpasswd auth) holding that image, so that
#     pulls with credentials are tested for real: $DIR/registry/{address,username,password}.
# Idempotent: a service that already answers is reused; the image is imported only when missing.
# Without root (a developer's laptop) it says why and exits 0: the container tests then skip with that reason
# (under CI=true they fail instead, see tests/conftest.py).
set -euo pipefail

DIR=${FEDML_PODMAN_DIR:-/tmp/fedml-podman}
SOCK="$DIR/podman.sock"
IMAGE=${FEDML_TEST_IMAGE:-localhost/fedml-busybox:latest}
REGISTRY=127.0.0.1:${FEDML_TEST_REGISTRY_PORT:-5741}
export CONTAINERS_CONF="$DIR/containers.conf"
export CONTAINERS_REGISTRIES_CONF="$DIR/registries.conf"

say() { echo "podman-up: $*" >&2; }

answers() {
    [ -S "$SOCK" ] && curl -fsS --max-time 2 --unix-socket "$SOCK" http://d/_ping >/dev/null 2>&1
}

if [ "${1:-}" = "--stop" ]; then
    for f in service.pid registry.pid; do
        [ -f "$DIR/$f" ] && { kill "$(cat "$DIR/$f")" 2>/dev/null || true; rm -f "$DIR/$f"; }
    done
    rm -f "$SOCK"
    say "stopped"
    exit 0
fi

need=""
for cmd in podman:podman runc:runc busybox:busybox-static curl:curl docker-registry:docker-registry \
        htpasswd:apache2-utils; do
    command -v "${cmd%%:*}" >/dev/null || need="$need ${cmd#*:}"
done
if [ -n "$need" ]; then
    if [ "$(id -u)" != 0 ]; then
        say "missing:$need; installing needs root; container tests will skip"
        exit 0
    fi
    say "installing$need"
    export DEBIAN_FRONTEND=noninteractive
    apt-get -o DPkg::Lock::Timeout=600 update -qq >/dev/null
    # No service starts from the install (docker-registry's own would listen on every interface).
    own_policy=""
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod +x /usr/sbin/policy-rc.d
        own_policy=1
    fi
    # shellcheck disable=SC2086
    apt-get -o DPkg::Lock::Timeout=600 install -y -qq $need >/dev/null
    [ -z "$own_policy" ] || rm -f /usr/sbin/policy-rc.d
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
cat >"$CONTAINERS_REGISTRIES_CONF" <<EOF
# Only our loopback registry, over plain HTTP; a bare image name is never looked up anywhere else.
unqualified-search-registries = []

[[registry]]
location = "$REGISTRY"
insecure = true
EOF

# A service started by an older version of this script lacks our registries.conf: start it again.
if answers && [ -f "$DIR/service.pid" ] \
        && ! tr '\0' '\n' <"/proc/$(cat "$DIR/service.pid")/environ" 2>/dev/null \
            | grep -qx "CONTAINERS_REGISTRIES_CONF=$CONTAINERS_REGISTRIES_CONF"; then
    kill "$(cat "$DIR/service.pid")" 2>/dev/null || true
    sleep 0.5
fi
if ! answers; then
    rm -f "$SOCK"
    # setsid: the service outlives this script and the make that ran it; --time=0: it never idles out.
    # Started from $DIR: conmon writes an `oom` marker into its working directory when a container is OOM-killed.
    setsid env -C "$DIR" podman system service --time=0 "unix://$SOCK" >"$DIR/service.log" 2>&1 </dev/null &
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

# The loopback registry with basic auth, holding the same image as $REGISTRY/fedml/busybox:latest.
reg="$DIR/registry"
mkdir -p "$reg/data"
if [ ! -s "$reg/password" ]; then
    (umask 077; head -c 18 /dev/urandom | base64 | tr -d '/+=' >"$reg/password")
    echo fedml >"$reg/username"
    htpasswd -Bbn fedml "$(cat "$reg/password")" >"$reg/htpasswd"
fi
echo "$REGISTRY" >"$reg/address"
cat >"$reg/config.yml" <<EOF
version: 0.1
log: {level: error}
storage: {filesystem: {rootdirectory: $reg/data}, delete: {enabled: true}}
http: {addr: "$REGISTRY"}
auth: {htpasswd: {realm: fedml-test, path: $reg/htpasswd}}
EOF
reg_up() { [ "$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "http://$REGISTRY/v2/")" = 401 ]; }
if ! reg_up; then
    setsid env -C "$DIR" docker-registry serve "$reg/config.yml" >"$DIR/registry.log" 2>&1 </dev/null &
    echo $! >"$DIR/registry.pid"
    for _ in $(seq 1 100); do
        reg_up && break
        sleep 0.1
    done
    if ! reg_up; then
        say "the registry did not start at $REGISTRY; its log:"
        tail -20 "$DIR/registry.log" >&2 || true
        exit 1
    fi
fi
podman push -q --tls-verify=false --creds "fedml:$(cat "$reg/password")" "$IMAGE" "$REGISTRY/fedml/busybox:latest"

echo "DOCKER_HOST=unix://$SOCK"
