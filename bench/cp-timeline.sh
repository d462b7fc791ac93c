#!/usr/bin/env bash
# Where a copy into an image waits: one `walt image cp` of bench/shell.sh's 217 MB tree
# into a busybox clone, with the machine's CPU ticks (/proc/stat) sampled every 20 ms:
# `#` busy, `w` iowait, `.` idle (CLK_TCK ticks over all cores). Then the server's
# account of the save (sanitize / hash / wait for the flush, and its total).
# Usage: bench/cp-timeline.sh   (root; run WALT_BENCH_CP_ONLY=1 bench/shell.sh once first)
source "$(dirname "$0")/lib.sh"
cp_tree_setup
WALT_BENCH_RUST_LOG=walt_store=debug,info start_walt "$W/data"
"$BIN/walt" image clone bench:bench/busybox tl >/dev/null
sync; sleep 20
python3 - "$BIN/walt" "$C/tree200" <<'PY'
import subprocess, sys, time
def ticks():
    v = list(map(int, open('/proc/stat').readline().split()[1:]))
    return v[0] + v[1] + v[2] + v[5] + v[6], v[4], v[3]
p = subprocess.Popen([sys.argv[1], 'image', 'cp', sys.argv[2], 'tl:/root/'], stdout=subprocess.DEVNULL)
t0 = time.monotonic(); last = ticks()
while p.poll() is None:
    time.sleep(0.02)
    now = ticks(); b, w, i = (now[k] - last[k] for k in range(3)); last = now
    print(f"{time.monotonic() - t0:5.2f} {'#' * b}{'w' * w}{'.' * i}")
print(f"cp in: {time.monotonic() - t0:.3f} s (exit {p.returncode})")
PY
grep "layer saved from" "$W/server.log" | tail -1 | grep -o 'sanitize_ms=[0-9.]* hash_ms=[0-9.]* sync_wait_ms=[0-9.]*'
grep "session saved" "$W/server.log" | tail -1 | grep -o 'elapsed_ms=[0-9.]*' | sed 's/^/save /'
stop_walt
