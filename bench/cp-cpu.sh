#!/usr/bin/env bash
# Where the CPU of a copy into an image goes, against `tar c | tar x` + `sync` of the
# same tree (bench/shell.sh's 217 MB / 7 515 files), both under `perf record -a`
# (every process of the machine), tool order rotated, a 31 s pause before each (the
# ext4 inode allocator skips inodes freed in the last 30 s). Prints, per run and tool,
# the wall time and the CPU time of each process name (ms; 999 Hz samples): the CLI
# (`walt`), the server's threads (`tokio-rt-worker`, `walt-hash`), the sandbox that
# extracts (`exe`), `tar`, the kernel's writeback (`kworker/*`), and idle (`swapper`); busy + idle over
# the cores is the command's time under perf.
# Usage: bench/cp-cpu.sh [runs]   (root; run bench/shell.sh once first for the tree)
source "$(dirname "$0")/lib.sh"
RUNS=${1:-2}
command -v perf >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -q linux-perf >/dev/null
cp_tree_setup
start_walt "$W/data"
# CPU ms per process name (kworkers summed) and the busy total, from a perf.data.
by_comm() {
  perf report -i "$1" --stdio --no-children -n --sort comm -g none 2>/dev/null \
    | awk '!/^#/ && /%/ { n=$2; c=$3; if (c ~ /^kworker/) c="kworker"; ms[c]+=n; if (c != "swapper") busy+=n }
           END { for (c in ms) if (ms[c] >= 5) printf "%s %d ms, ", c, ms[c]; printf "busy %d ms of %d (%d cores)\n", busy, busy + ms["swapper"], cores }' cores="$(nproc)"
}
walt_cp() {
  "$BIN/walt" image clone bench:bench/busybox "cp$1" >/dev/null
  sync; sleep 31
  perf record -q -F 999 -a -o "$W/p.walt" -- "$BIN/walt" image cp "$C/tree200" "cp$1:/root/" >/dev/null 2>"$W/cp.err" || { cat "$W/cp.err" >&2; exit 1; }
  echo "run $1 walt image cp (durable): $(by_comm "$W/p.walt")"
}
tar_cp() {
  mkdir -p "$W/t$1"; sync; sleep 31
  perf record -q -F 999 -a -o "$W/p.tar" -- sh -c "tar -C '$C' -cf - tree200 | tar -C '$W/t$1' -xf -; sync" >/dev/null 2>&1
  echo "run $1 tar c | tar x + sync:      $(by_comm "$W/p.tar")"
}
for r in $(seq "$RUNS"); do
  if [ $((r % 2)) -eq 1 ]; then walt_cp "$r"; tar_cp "$r"; else tar_cp "$r"; walt_cp "$r"; fi
done
