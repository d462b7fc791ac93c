#!/usr/bin/env bash
# Latency of a short command over TLS vs in clear (issue 11, item 5: TLS
# may cost at most 2 ms on `walt image show`).
# Two walt-servers on the same store (3 images cloned from a loopback
# registry): one with its TLS certificate, one started with --plaintext.
# The same walt binary runs `walt image show` N times against each,
# alternating (TLS, clear, TLS, clear...), each run a new process: TCP
# connect, TLS handshake (verifying the pinned certificate), the call, exit.
# Prints the median and the 90th percentile of each side, and the difference
# of the medians.
# Usage: bench/show-latency.sh [N]   (needs root; builds walt in release mode)
source "$(dirname "$0")/lib.sh"
N=${1:-200}
[ -n "${WALT_BENCH_NOBUILD:-}" ] || (cd "$ROOT" && cargo build --release -q -p walt-server -p walt-cli)

make_layers tiny dir:/etc/debian_version
start_registry
for i in 1 2 3; do push_image tiny "bench/image-$i" latest; done

# The TLS server (its key and certificate created in $W/tls, next to its
# configuration), then three images in its store.
start_walt "$W/data"
TLS_CONFIG=$WALT_CONFIG
# The first command pins the certificate (one line on stderr, not timed).
"$BIN/walt" image show >/dev/null 2>&1
for i in 1 2 3; do "$BIN/walt" image clone "bench:bench/image-$i" >/dev/null 2>&1; done
[ "$("$BIN/walt" image show --names-only | wc -l)" = 3 ] || { echo "the images were not cloned" >&2; exit 1; }

# The server in clear, on the same store.
PLAIN_PORT=$(free_port)
RUST_LOG=info "$BIN/walt-server" --plaintext --config "$W/server.conf" --data-dir "$W/data" \
  --listen "127.0.0.1:$PLAIN_PORT" --event-socket "$W/dhcp-event-plain.sock" \
  --exports-file "$W/walt-plain.exports" 2>>"$W/server-plain.log" &
pids+=($!)
wait_tcp "$PLAIN_PORT"
PLAIN_CONFIG=$W/walt-plain.conf
printf 'walt:\n    server: 127.0.0.1:%s\n    username: bench\n    plaintext: true\n' "$PLAIN_PORT" > "$PLAIN_CONFIG"
[ "$(WALT_CONFIG=$PLAIN_CONFIG "$BIN/walt" image show --names-only | wc -l)" = 3 ] || { echo "the plaintext server does not show the images" >&2; exit 1; }

# One timed run in ms ($EPOCHREALTIME: no fork around the measured command).
run_ms() {
  local t0 t1
  t0=$EPOCHREALTIME
  WALT_CONFIG=$1 "$BIN/walt" image show >/dev/null 2>&1 || { echo "walt image show failed ($1)" >&2; exit 1; }
  t1=$EPOCHREALTIME
  python3 -c "print(f'{($t1-$t0)*1000:.3f}')"
}
# A few warm-up runs each (page cache, server threads).
for _ in 1 2 3 4 5; do run_ms "$TLS_CONFIG" >/dev/null; run_ms "$PLAIN_CONFIG" >/dev/null; done
tls=(); plain=()
for _ in $(seq "$N"); do
  tls+=("$(run_ms "$TLS_CONFIG")")
  plain+=("$(run_ms "$PLAIN_CONFIG")")
done
p90() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {i=int(NR*0.9); if (i<1) i=1; print a[i]}'; }
mt=$(median "${tls[@]}"); mp=$(median "${plain[@]}")
echo "walt image show, $N runs each, alternating (3 images in the working set):"
printf '  TLS (pinned certificate): median %s ms, p90 %s ms\n' "$mt" "$(p90 "${tls[@]}")"
printf '  --plaintext:              median %s ms, p90 %s ms\n' "$mp" "$(p90 "${plain[@]}")"
printf '  difference of the medians: %s ms\n' "$(python3 -c "print(f'{$mt-$mp:.3f}')")"
