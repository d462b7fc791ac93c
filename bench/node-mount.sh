#!/usr/bin/env bash
# Mounting an image for a node: a 20-layer image (goal < 100 ms).
#   walt: the server's own timing of "image mounted for nodes" (overlay of the 20
#         layers with index=on,nfs_export=on, the per-image adaptations written
#         through it, remounted read-only), and the time from the DHCP event to the
#         "node serving ready" line (links, exports and TFTP map written);
#   by hand: `mount -t overlay` of the same 20 layer dirs with the same options,
#         then `umount` (the floor: the kernel's own work plus one exec).
# Each walt run restarts the server (a clean stop unmounts), so every run mounts.
# Usage: bench/node-mount.sh [runs]   (needs root; builds walt in release mode,
# WALT_BENCH_DEBUG=1 uses the debug binaries as they are)
source "$(dirname "$0")/lib.sh"
RUNS=${1:-10}
if [ -n "${WALT_BENCH_DEBUG:-}" ]; then
  BIN=$ROOT/target/debug
else
  [ -n "${WALT_BENCH_NOBUILD:-}" ] || (cd "$ROOT" && cargo build --release --bins -q)
fi
command -v pigz >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -q pigz >/dev/null
command -v sqlite3 >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -q sqlite3 >/dev/null

specs=(); for i in $(seq 20); do specs+=(rand:1); done
make_layers node20 "${specs[@]}"
start_registry
push_image node20 waltplatform/pc-x86-64-default

DATA=$W/data
MAC=52:54:00:00:00:01
IP=192.168.152.10
WALT_PORT=$(free_port)
cat > "$W/server.conf" <<YML
network: { walt-net: { ip: 192.168.152.1/24 } }
registries:
-   {label: bench, api: docker-registry-v2, description: Bench registry, host: 127.0.0.1, port: $REG_PORT, protocol: http, auth: none}
nodes: { unmount-grace: 60s }
YML
run_server() {
  RUST_LOG=info "$BIN/walt-server" --config "$W/server.conf" --data-dir "$DATA" --listen "127.0.0.1:$WALT_PORT" \
    --plaintext --event-socket "$W/event.sock" --exports-file "$W/walt.exports" 2>>"$W/server.log" &
  WALT_PID=$!; pids+=($WALT_PID)
  wait_tcp "$WALT_PORT"
  for _ in $(seq 200); do [ -S "$W/event.sock" ] && return 0; sleep 0.05; done
  echo "no event socket" >&2; return 1
}
lease() { WALT_DHCP_EVENT_SOCKET=$W/event.sock "$BIN/walt-dhcp-event" commit walt.node.pc-x86-64 "" "$IP" "$MAC" "" 0 unknown; }
ready_count() { grep -c 'node serving ready' "$W/server.log" || true; }
wait_ready() { # COUNT: waits for that many "node serving ready" lines
  for _ in $(seq 600); do [ "$(ready_count)" -ge "$1" ] && return 0; sleep 0.01; done
  echo "no 'node serving ready' line" >&2; tail -20 "$W/server.log" >&2; return 1
}
last_mount_ms() { printf '%.2f' "$(grep 'image mounted for nodes' "$W/server.log" | grep -o ' ms=[0-9.]*' | tail -1 | cut -d= -f2)"; }

run_server
export WALT_CONFIG=$W/walt.conf
printf 'walt:\n    server: 127.0.0.1:%s\n    username: bench\n    plaintext: true\n' "$WALT_PORT" > "$WALT_CONFIG"
"$BIN/walt" image clone bench:waltplatform/pc-x86-64-default:latest node20 >/dev/null
# The device, then (until the default image fetch makes it one by itself) a node
# booting the clone, recorded in the database; a second lease makes the server
# catch up: this is the run measured from the event.
lease
for _ in $(seq 200); do
  [ -n "$(sqlite3 "$DATA/walt.db" "SELECT mac FROM devices WHERE mac='$MAC'")" ] && break; sleep 0.05
done
sqlite3 "$DATA/walt.db" "UPDATE devices SET type='node', reason=NULL WHERE mac='$MAC'; \
  INSERT OR REPLACE INTO nodes (mac, model, image_id) SELECT '$MAC', 'pc-x86-64', id FROM images WHERE name='node20' AND (SELECT type FROM devices WHERE mac='$MAC')='node';"
n=$(ready_count)
t0=$(now); lease; wait_ready $((n + 1)); t1=$(now)
event_ms=$(python3 -c "print(f'{($t1-$t0)*1000:.1f}')")
walt_ms=("$(last_mount_ms)")
for _ in $(seq 2 "$RUNS"); do
  stop_walt
  n=$(ready_count)
  run_server
  wait_ready $((n + 1))
  walt_ms+=("$(last_mount_ms)")
done
stop_walt

# By hand: the same layers, lowest first in the store = last in lowerdir.
layers=()
for i in $(seq 20); do layers=("$DATA/layers/$(cat "$CACHE/node20/$i.diffid")/diff" "${layers[@]}"); done
lower=$(IFS=:; echo "${layers[*]}")
mkdir -p "$W/hand"
hand_ms=()
for _ in $(seq "$RUNS"); do
  rm -rf "$W/hand"/{upper,work}; mkdir -p "$W/hand"/{upper,work,fs}
  t0=$(now)
  mount -t overlay walt-bench -o "lowerdir=$lower,upperdir=$W/hand/upper,workdir=$W/hand/work,redirect_dir=off,metacopy=off,xino=off,index=on,nfs_export=on,nodev,nosuid" "$W/hand/fs"
  t1=$(now)
  umount "$W/hand/fs"
  hand_ms+=("$(python3 -c "print(f'{($t1-$t0)*1000:.1f}')")")
done

echo "20-layer image, $RUNS runs ($( [ -n "${WALT_BENCH_DEBUG:-}" ] && echo debug || echo release ) build)"
echo "walt mount (overlay + adaptations + read-only), ms: median $(median "${walt_ms[@]}"), best $(best "${walt_ms[@]}")   [${walt_ms[*]}]"
echo "DHCP event -> node serving ready (first mount), ms: $event_ms"
echo "mount -t overlay by hand, ms: median $(median "${hand_ms[@]}"), best $(best "${hand_ms[@]}")   [${hand_ms[*]}]"
