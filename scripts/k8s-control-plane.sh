#!/usr/bin/env bash
# A real Kubernetes control plane on loopback for the tests (no kubelet: tests play the kubelet).
#
#   scripts/k8s-control-plane.sh build         build kube-apiserver/-controller-manager/-scheduler (or reuse the cache)
#   scripts/k8s-control-plane.sh check         exit 0 if the binaries (and etcd) are there
#   scripts/k8s-control-plane.sh start DIR     start etcd + the three on free 127.0.0.1 ports; writes DIR/kubeconfig
#   scripts/k8s-control-plane.sh stop DIR      stop what `start DIR` started
#
# No registry ships kube-apiserver, so it is built offline from Debian's `kubernetes` source package
# (1.20.2, vendor tree included) with Debian's golang-go. The binaries live OUTSIDE the repo
# ($FEDML_K8S_CACHE, default ~/.cache/fedml-k8s) so a fresh clone (CI) reuses them; a cold build is ~4 min of CPU.
set -euo pipefail

K8S_VERSION=1.20.2
CACHE=${FEDML_K8S_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/fedml-k8s}
BIN=$CACHE/bin-$K8S_VERSION
COMPONENTS=(kube-apiserver kube-controller-manager kube-scheduler)

log() { echo "k8s-control-plane: $*" >&2; }
die() { log "$*"; exit 1; }

have_binaries() {
    local c
    for c in "${COMPONENTS[@]}"; do [[ -x $BIN/$c ]] || return 1; done
    command -v etcd >/dev/null
}

apt_install() {
    # Only as root (CI); a developer without root installs these once by hand.
    local missing=()
    command -v go >/dev/null || missing+=(golang-go)
    command -v etcd >/dev/null || missing+=(etcd-server)
    command -v dpkg-source >/dev/null || missing+=(dpkg-dev)
    [[ ${#missing[@]} -eq 0 ]] && return 0
    [[ $(id -u) -eq 0 ]] || die "missing ${missing[*]}: run as root or apt-get install them"
    log "apt-get install ${missing[*]}"
    apt-get -o DPkg::Lock::Timeout=600 update >/dev/null  # a fresh machine's package lists may be empty or stale
    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y --no-install-recommends "${missing[@]}" >/dev/null
}

fetch_source() {
    local src=$CACHE/src
    if [[ -f $src/kubernetes-$K8S_VERSION/go.mod ]]; then return 0; fi
    mkdir -p "$src"
    if ! compgen -G "$src/kubernetes_*.dsc" >/dev/null; then
        if ! apt-cache showsrc kubernetes >/dev/null 2>&1; then
            [[ $(id -u) -eq 0 ]] || die "no deb-src for 'kubernetes': add a deb-src line (as root) and apt-get update"
            log "adding deb-src for the kubernetes source package"
            # shellcheck disable=SC1091
            . /etc/os-release
            cat >/etc/apt/sources.list.d/fedml-src.sources <<EOF
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: ${VERSION_CODENAME:-bookworm}
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
            apt-get -o DPkg::Lock::Timeout=600 update >/dev/null
        fi
        (cd "$src" && apt-get -o DPkg::Lock::Timeout=600 source --download-only kubernetes >/dev/null 2>&1) || die "apt-get source kubernetes failed"
    fi
    log "unpacking the source"
    rm -rf "$src/kubernetes-$K8S_VERSION.tmp"
    (cd "$src" && dpkg-source --no-check -x kubernetes_*.dsc "kubernetes-$K8S_VERSION.tmp" >/dev/null)
    mv "$src/kubernetes-$K8S_VERSION.tmp" "$src/kubernetes-$K8S_VERSION"
}

build() {
    if have_binaries; then log "reusing $BIN"; return 0; fi
    apt_install
    if have_binaries; then return 0; fi
    fetch_source
    local tree=$CACHE/src/kubernetes-$K8S_VERSION start=$SECONDS
    log "building ${COMPONENTS[*]} (offline, a few minutes)"
    # KUBE_GIT_* : the tarball has no .git; the version string is what `kubectl version` reports.
    (cd "$tree" && GOPROXY=off GOFLAGS=-mod=vendor CGO_ENABLED=0 GOCACHE=$CACHE/gocache GOPATH=$CACHE/gopath \
        KUBE_GIT_VERSION=v$K8S_VERSION KUBE_GIT_TREE_STATE=clean \
        make WHAT="cmd/kube-apiserver cmd/kube-controller-manager cmd/kube-scheduler" >"$CACHE/build.log" 2>&1) \
        || { tail -30 "$CACHE/build.log" >&2; die "build failed (full log: $CACHE/build.log)"; }
    mkdir -p "$BIN.tmp"
    local c
    for c in "${COMPONENTS[@]}"; do cp "$tree/_output/bin/$c" "$BIN.tmp/$c"; done
    rm -rf "$BIN" && mv "$BIN.tmp" "$BIN"
    # The tree and Go's cache are ~2.5 GB; the binaries are what we keep (the source package stays, 35 MB).
    rm -rf "$tree"
    log "built in $((SECONDS - start)) s: $BIN"
}

free_ports() {  # N free loopback ports
    "${PYTHON:-python3}" - "$1" <<'EOF'
import socket, sys
socks = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
}

certs() {  # a CA, serving certs for the apiserver and for the tests' kubelet (127.0.0.1), the service-account keys
    local d=$1 name
    openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj /CN=fedml-test-ca \
        -keyout "$d/ca.key" -out "$d/ca.crt" 2>/dev/null
    for name in apiserver kubelet; do
        openssl req -newkey rsa:2048 -nodes -subj "/CN=$name" -keyout "$d/$name.key" -out "$d/$name.csr" 2>/dev/null
        echo "subjectAltName=IP:127.0.0.1,DNS:localhost,IP:10.0.0.1,DNS:kubernetes.default.svc" >"$d/$name.ext"
        openssl x509 -req -in "$d/$name.csr" -CA "$d/ca.crt" -CAkey "$d/ca.key" -CAcreateserial -days 3650 \
            -extfile "$d/$name.ext" -out "$d/$name.crt" 2>/dev/null
    done
    openssl genrsa -out "$d/sa.key" 2048 2>/dev/null
    openssl rsa -in "$d/sa.key" -pubout -out "$d/sa.pub" 2>/dev/null
}

kubeconfig() {  # FILE SERVER TOKEN
    cat >"$1" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: fedml-test
  cluster: {server: "$2", certificate-authority: "$(dirname "$1")/ca.crt"}
users:
- name: admin
  user: {token: "$3"}
contexts:
- name: fedml-test
  context: {cluster: fedml-test, user: admin, namespace: default}
current-context: fedml-test
EOF
}

daemon() {  # NAME CMD...: started in its own session; pid kept for `stop`
    local name=$1
    shift
    setsid "$@" >"$DIR/$name.log" 2>&1 </dev/null &
    echo "$! $name" >>"$DIR/pids"
}

pid_alive() {
    local pid
    pid=$(awk -v n="$1" '$2 == n {print $1}' "$DIR/pids")
    [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null
}

wait_ready() {  # URL TOKEN NAME TIMEOUT_S
    local deadline=$((SECONDS + $4))
    until curl -skf -H "Authorization: Bearer $2" "$1" >/dev/null 2>&1; do
        if ((SECONDS > deadline)) || ! pid_alive "$3"; then
            tail -20 "$DIR/$3.log" >&2
            stop "$DIR"
            die "$3 did not become ready (log: $DIR/$3.log)"
        fi
        sleep 0.2
    done
}

start() {
    DIR=$(mkdir -p "$1" && cd "$1" && pwd)
    have_binaries || die "no binaries in $BIN: run '$0 build' first"
    local t0=$SECONDS token etcd_client etcd_peer api kcm sched data
    : >"$DIR/pids"
    certs "$DIR"
    token=$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')
    echo "$token,admin,admin,system:masters" >"$DIR/tokens.csv"
    read -r etcd_client etcd_peer api kcm sched <<<"$(free_ports 5)"
    # etcd's fsyncs on a shared disk dominate API latency; its data is throw-away, so tmpfs when there is one.
    data=$(mktemp -d "$([[ -d /dev/shm && -w /dev/shm ]] && echo /dev/shm || echo "$DIR")/fedml-etcd.XXXXXX")
    echo "$data" >"$DIR/etcd-data"
    daemon etcd etcd --name default --data-dir "$data" \
        --listen-client-urls "http://127.0.0.1:$etcd_client" --advertise-client-urls "http://127.0.0.1:$etcd_client" \
        --listen-peer-urls "http://127.0.0.1:$etcd_peer" --initial-advertise-peer-urls "http://127.0.0.1:$etcd_peer" \
        --initial-cluster "default=http://127.0.0.1:$etcd_peer"
    daemon kube-apiserver "$BIN/kube-apiserver" --etcd-servers "http://127.0.0.1:$etcd_client" \
        --bind-address 127.0.0.1 --advertise-address 127.0.0.1 --secure-port "$api" --insecure-port 0 \
        --tls-cert-file "$DIR/apiserver.crt" --tls-private-key-file "$DIR/apiserver.key" \
        --token-auth-file "$DIR/tokens.csv" --authorization-mode RBAC \
        --service-account-key-file "$DIR/sa.pub" --service-account-signing-key-file "$DIR/sa.key" \
        --service-account-issuer https://kubernetes.default.svc --service-cluster-ip-range 10.0.0.0/24 \
        --kubelet-certificate-authority "$DIR/ca.crt" --kubelet-preferred-address-types InternalIP \
        --endpoint-reconciler-type none --profiling=false
    local url=https://127.0.0.1:$api
    kubeconfig "$DIR/kubeconfig" "$url" "$token"
    wait_ready "$url/readyz" "$token" kube-apiserver 60
    # nodelifecycle is off: with no kubelet it would taint every node unreachable and evict the pods.
    daemon kube-controller-manager "$BIN/kube-controller-manager" --kubeconfig "$DIR/kubeconfig" \
        --authentication-kubeconfig "$DIR/kubeconfig" --authorization-kubeconfig "$DIR/kubeconfig" \
        --bind-address 127.0.0.1 --secure-port "$kcm" --port 0 --leader-elect=false \
        --controllers '*,-nodelifecycle' --service-account-private-key-file "$DIR/sa.key" \
        --root-ca-file "$DIR/ca.crt" --use-service-account-credentials=false --profiling=false
    daemon kube-scheduler "$BIN/kube-scheduler" --kubeconfig "$DIR/kubeconfig" \
        --authentication-kubeconfig "$DIR/kubeconfig" --authorization-kubeconfig "$DIR/kubeconfig" \
        --bind-address 127.0.0.1 --secure-port "$sched" --port 0 --leader-elect=false --profiling=false
    wait_ready "https://127.0.0.1:$kcm/healthz" "$token" kube-controller-manager 60
    wait_ready "https://127.0.0.1:$sched/healthz" "$token" kube-scheduler 60
    echo "$url" >"$DIR/url"
    log "ready in $((SECONDS - t0)) s: KUBECONFIG=$DIR/kubeconfig"
}

stop() {
    DIR=$1
    [[ -f $DIR/pids ]] || return 0
    local pid name i left pids=()
    while read -r pid name; do pids+=("$pid"); done < <(tac "$DIR/pids")
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    for i in $(seq 50); do
        left=0
        for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && left=1; done
        ((left)) || break
        sleep 0.1
    done
    for pid in "${pids[@]}"; do kill -9 "$pid" 2>/dev/null || true; done
    [[ -f $DIR/etcd-data ]] && rm -rf "$(cat "$DIR/etcd-data")"
    rm -f "$DIR/pids"
}

case "${1:-}" in
    build) build ;;
    check) have_binaries || die "not built: no ${COMPONENTS[*]} in $BIN or no etcd (run '$0 build')"; echo "$BIN" ;;
    start) [[ -n ${2:-} ]] || die "usage: $0 start DIR"; build; start "$2" ;;
    stop) [[ -n ${2:-} ]] || die "usage: $0 stop DIR"; stop "$2" ;;
    *) echo "usage: $0 build | start DIR | stop DIR" >&2; exit 2 ;;
esac
