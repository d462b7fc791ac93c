#!/usr/bin/env bash
# Self-contained walt demo: a local registry seeded with an image built offline
# from busybox-static, the walt server, and the walt CLI cloning, showing, copying into and opening a shell in it.
set -euo pipefail
cd "$(dirname "$0")"
[ -x ./scripts/install-deps.sh ] && ./scripts/install-deps.sh
PROFILE=${WALT_DEMO_PROFILE:-release}
cargo build --profile "$PROFILE" --bins -q
BIN=$PWD/target/$([ "$PROFILE" = dev ] && echo debug || echo "$PROFILE")
W=$(mktemp -d /tmp/walt-demo.XXXXXX)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$W"; }
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_http() { for _ in $(seq 100); do curl -fs "$1" >/dev/null 2>&1 && return 0; sleep 0.1; done; echo "$1 did not come up" >&2; return 1; }
wait_tcp() { for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.1; done; echo "port $1 did not open" >&2; return 1; }

echo "== 1. a local registry on 127.0.0.1"
RP=$(free_port)
cat > "$W/registry.yml" <<YML
version: 0.1
storage: { filesystem: { rootdirectory: $W/registry }, delete: { enabled: true } }
http: { addr: 127.0.0.1:$RP }
log: { level: error }
YML
docker-registry serve "$W/registry.yml" >"$W/registry.log" 2>&1 & pids+=($!)
wait_http "http://127.0.0.1:$RP/v2/"

echo "== 2. an image built offline from busybox-static, pushed with umoci + skopeo"
./images/busybox/build.sh "$W/oci" pc-x86-64 amd64 >/dev/null
skopeo copy -q --dest-tls-verify=false "oci:$W/oci:latest" "docker://127.0.0.1:$RP/waltplatform/pc-x86-64-default:latest"

echo "== 3. walt-server, configured with this registry as 'demo'"
SP=$(free_port)
cat > "$W/server.conf" <<YML
registries:
-   label: demo
    api: docker-registry-v2
    description: Demo registry
    host: 127.0.0.1
    port: $RP
    protocol: http
    auth: none
YML
"$BIN/walt-server" --config "$W/server.conf" --data-dir "$W/data" --listen "127.0.0.1:$SP" \
    --event-socket "$W/dhcp-event.sock" --exports-file "$W/walt.exports" 2>"$W/server.log" & pids+=($!)
wait_tcp "$SP"
export WALT_CONFIG=$W/walt.conf
printf 'walt:\n    server: 127.0.0.1:%s\n    username: demo\n' "$SP" > "$WALT_CONFIG"

run() { echo "\$ $*"; "$@"; }
echo "== 4. the walt CLI"
run "$BIN/walt" image show
run "$BIN/walt" image clone demo:waltplatform/pc-x86-64-default
run "$BIN/walt" image clone demo:waltplatform/pc-x86-64-default my-image
run "$BIN/walt" image show
run "$BIN/walt" image rename my-image experiment
run "$BIN/walt" image duplicate experiment experiment:v2
printf 'walt:\n    server: 127.0.0.1:%s\n    username: bob\n' "$SP" > "$W/bob.conf"
echo "(as user bob)"; WALT_CONFIG=$W/bob.conf run "$BIN/walt" image clone walt:demo/experiment:v2 from-demo
run "$BIN/walt" image show --all
echo "== 5. inside the image: cp and shell (interactive on a terminal; here its input is piped)"
echo "hello from the demo" > "$W/note.txt"
run "$BIN/walt" image cp "$W/note.txt" experiment:/root/
echo "\$ walt image shell experiment  <<< 'hostname; cat /root/note.txt; uname -m; exit'"
printf 'hostname; cat /root/note.txt; uname -m; exit\n' | "$BIN/walt" image shell experiment
run "$BIN/walt" image cp experiment:/etc/passwd "$W/passwd-from-image"
run cat "$W/passwd-from-image"
echo "== the demo worked; server log: $W/server.log (removed on exit)"
