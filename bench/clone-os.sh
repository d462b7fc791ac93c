#!/usr/bin/env bash
# Clone benchmark on a real OS image (issue 14): a Debian bookworm rootfs of the
# size users clone (mmdebstrap --variant=standard: ~410 MB, ~21 800 entries, one
# gzip layer of ~145 MB; see make_debian_os in lib.sh), on one loopback registry:
#   walt image clone (cold store)  vs  podman pull (fresh storage root)
#   vs  skopeo copy docker://… oci:… (download only)
#   vs  tar -xf of the uncompressed layer + sync, on the same disk.
# Every run uses new, empty directories (nothing deleted before a timing, see
# bench/clone.sh), starts with `sync`, and the tool order rotates between runs.
# Prints medians and the ratios walt/podman (target <= 0.30) and
# walt/(tar+sync) (target <= 0.9), and the floor the CPU of the server and of the
# registry sets on this many cores. WALT_BENCH_LOG=FILE keeps the server log;
# WALT_BENCH_PERF=1 adds a profile of one more clone.
# Usage: bench/clone-os.sh [runs]   (needs root; builds walt in release mode
#        unless WALT_BENCH_NOBUILD=1)
source "$(dirname "$0")/lib.sh"
RUNS=${1:-3}
command -v mmdebstrap >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -q mmdebstrap >/dev/null
command -v pigz >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -q pigz >/dev/null
command -v podman >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -q podman >/dev/null
command -v skopeo >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -q skopeo >/dev/null
[ -n "${WALT_BENCH_NOBUILD:-}" ] || (cd "$ROOT" && cargo build --release --bins -q)

# WALT_BENCH_OS_TAR=TAR: the image is that root filesystem tarball instead (e.g. the
# pc-x86-64-default rootfs cached by images/build.sh in /var/cache/walt-images/).
if [ -n "${WALT_BENCH_OS_TAR:-}" ]; then
  make_tar_image "$WALT_BENCH_OS_TAR"; DEBIAN_OS=$TAR_IMAGE; DESC=$(basename "$WALT_BENCH_OS_TAR")
else
  make_debian_os; DESC="Debian $DEBIAN_OS_SUITE $DEBIAN_OS_VARIANT"
fi
OS=$CACHE/$DEBIAN_OS
start_registry; REG_PID=${pids[-1]}
push_image "$DEBIAN_OS" bench/debian-os
gz_mb=$(( $(stat -c %s "$OS/1.tar.gz") / 1000000 ))
entries=$(tar -tf "$OS/1.tar" | wc -l); files=$(tar -tvf "$OS/1.tar" | grep -c '^-')
# The unpacked size from the listing (unpacking it to measure, then deleting it, would
# charge the first runs for ext4's recently deleted inodes: see bench/lib.sh).
root_mb=$(tar -tvf "$OS/1.tar" | awk '{ b += $3 } END { printf "%d", b / 1000000 }')
echo "image: 1 layer, $gz_mb MB gzip, $root_mb MB / $entries entries ($files files) unpacked; $RUNS runs, median kept" >&2
# Podman's overlay mounts go before $W is removed.
podman_cleanup() {
  local d
  for d in "$W"/podman-*; do
    [ -d "$d" ] || continue
    CONTAINERS_STORAGE_CONF=$d/storage.conf CONTAINERS_CONF=$d/containers.conf podman rmi -af >/dev/null 2>&1 || true
    umount "$d/root/overlay" 2>/dev/null || true
  done
}
trap 'podman_cleanup; cleanup' EXIT

REF=127.0.0.1:$REG_PORT/bench/debian-os:latest
TCK=$(getconf CLK_TCK)
cpu_s() { awk -v t="$TCK" '{printf "%.2f", ($14+$15)/t}' "/proc/$1/stat"; } # user+system CPU of PID
run_walt() {
  start_walt "$W/data-$1"
  sync; local t0 t1 c0 r0; c0=$(cpu_s "$WALT_PID"); r0=$(cpu_s "$REG_PID"); t0=$(now); "$BIN/walt" image clone bench:bench/debian-os >/dev/null; t1=$(now)
  walt_t+=("$(elapsed "$t0" "$t1")"); walt_cpu+=("$(elapsed "$c0" "$(cpu_s "$WALT_PID")")")
  reg_cpu+=("$(elapsed "$r0" "$(cpu_s "$REG_PID")")")
  stop_walt
}
run_podman() {
  podman_env "$W/podman-$1"
  sync; local t0 t1; t0=$(now); podman pull -q --tls-verify=false "$REF" >/dev/null; t1=$(now)
  podman_t+=("$(elapsed "$t0" "$t1")")
}
run_skopeo() {
  sync; local t0 t1; t0=$(now); skopeo copy -q --src-tls-verify=false "docker://$REF" "oci:$W/oci-$1:latest"; t1=$(now)
  skopeo_t+=("$(elapsed "$t0" "$t1")")
}
run_tar() {
  mkdir -p "$W/tar-$1"
  sync; local t0 t1; t0=$(now); tar -C "$W/tar-$1" -xf "$OS/1.tar"; sync; t1=$(now)
  tar_t+=("$(elapsed "$t0" "$t1")")
}

walt_t=(); walt_cpu=(); reg_cpu=(); podman_t=(); skopeo_t=(); tar_t=()
tools=(walt podman skopeo tar)
for r in $(seq "$RUNS"); do
  for i in 0 1 2 3; do
    "run_${tools[$(( (i + r - 1) % 4 ))]}" "$r"
  done
  echo "run $r: walt ${walt_t[-1]} s (server CPU ${walt_cpu[-1]} s, registry CPU ${reg_cpu[-1]} s)  podman ${podman_t[-1]} s  skopeo ${skopeo_t[-1]} s  tar+sync ${tar_t[-1]} s" >&2
done
# WALT_BENCH_PERF=1: one more clone (not counted) under `perf record`, and where
# the server's CPU time goes, by thread and by symbol (on stderr).
if [ -n "${WALT_BENCH_PERF:-}" ]; then
  start_walt "$W/data-perf"
  sync
  perf record -q -F 499 -p "$WALT_PID" -o "$W/perf.data" 2>/dev/null & PERF=$!
  sleep 0.5 # perf attaches to the running server (no synchronisation is offered)
  "$BIN/walt" image clone bench:bench/debian-os >/dev/null
  kill -INT "$PERF"; wait "$PERF" || true
  stop_walt
  { echo "server CPU by thread:"; perf report -i "$W/perf.data" --stdio --sort comm 2>/dev/null | grep -v '^#' | grep . | sed -n 1,8p
    echo "server CPU by symbol:"; perf report -i "$W/perf.data" --stdio --sort dso,sym 2>/dev/null | grep -v '^#' | grep . | sed -n 1,20p; } >&2
fi
[ -z "${WALT_BENCH_LOG:-}" ] || cp "$W/server.log" "$WALT_BENCH_LOG"
wm=$(median "${walt_t[@]}"); wc=$(median "${walt_cpu[@]}"); rc=$(median "${reg_cpu[@]}")
# The floor of a clone on this machine: the CPU the server and the registry spend
# for it, spread over every core with perfect overlap.
CORES=$(nproc); floor=$(python3 -c "print(f'{($wc+$rc)/$CORES:.3f}')")
 pm=$(median "${podman_t[@]}"); sm=$(median "${skopeo_t[@]}"); tm=$(median "${tar_t[@]}")

cat <<OUT
| measure ($DESC, $gz_mb MB gzip, $root_mb MB / $files files; median of $RUNS) | walt | reference | ratio (walt/ref) | target |
| --- | --- | --- | --- | --- |
| clone, cold store | ${wm} s | podman pull ${pm} s | $(ratio "$wm" "$pm") | <= 0.30 |
| same | ${wm} s | tar -xf of the uncompressed layer + sync ${tm} s | $(ratio "$wm" "$tm") | <= 0.9 |
| same | ${wm} s | skopeo copy to oci: (download only) ${sm} s | $(ratio "$wm" "$sm") | — |
| server CPU time (user + system) of the clone | ${wc} s | registry CPU while serving it ${rc} s | — | — |
| floor: (server + registry CPU) / $CORES cores | ${floor} s | tar -xf + sync ${tm} s | $(ratio "$floor" "$tm") | — |
OUT
