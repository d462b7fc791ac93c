#!/usr/bin/env bash
# Publish benchmark on a real OS image (issue 14): walt image publish of the
# pc-x86-64-default root filesystem (one gzip layer) to an empty registry
#   vs. skopeo copy oci:… docker://… of the same image to another empty one.
# The image: WALT_BENCH_OS_TAR=TAR (default: the newest rootfs images/build.sh
# cached, /var/cache/walt-images/pc-x86-64-*.tar), else the Debian OS image of
# bench/clone-os.sh (make_debian_os). walt publishes the image it cloned (its
# stored gzip blob); skopeo the OCI layout it copied from the same source, so
# both upload the same compressed bytes. Both targets are the same kind of
# registry (docker-registry, loopback, filesystem storage), new and empty for
# every run (deleted after it); `sync` before each timing; the order of the
# tools rotates between runs; medians of RUNS, and the ratio walt/skopeo
# (target <= 1.0).
# Usage: bench/publish-os.sh [runs]   (needs root; builds walt in release mode
#        unless WALT_BENCH_NOBUILD=1)
source "$(dirname "$0")/lib.sh"
RUNS=${1:-3}
command -v pigz >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -q pigz >/dev/null
command -v skopeo >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -q skopeo >/dev/null
[ -n "${WALT_BENCH_NOBUILD:-}" ] || (cd "$ROOT" && cargo build --release --bins -q)

OS_TAR=${WALT_BENCH_OS_TAR:-$(ls -t /var/cache/walt-images/pc-x86-64-*.tar 2>/dev/null | head -1 || true)}
if [ -n "$OS_TAR" ]; then
  make_tar_image "$OS_TAR"; IMG=$TAR_IMAGE; DESC=$(basename "$OS_TAR")
else
  command -v mmdebstrap >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -q mmdebstrap >/dev/null
  make_debian_os; IMG=$DEBIAN_OS; DESC="Debian $DEBIAN_OS_SUITE $DEBIAN_OS_VARIANT"
fi
gz_mb=$(( $(stat -c %s "$CACHE/$IMG/1.tar.gz") / 1000000 ))
start_registry src; SRC=$REG_PORT
push_image "$IMG" bench/os
skopeo copy -q --src-tls-verify=false "docker://127.0.0.1:$SRC/bench/os:latest" "oci:$W/oci:latest"
# walt's copy: cloned once, published to a new registry at every run (the
# server restarts with that registry as `target`).
start_walt "$W/data"
"$BIN/walt" image clone bench:bench/os os >/dev/null
stop_walt

# new_registry NAME -> NEW_PORT, NEW_PID (storage in $W/registry-NAME)
new_registry() { start_registry "$1"; NEW_PORT=$REG_PORT; NEW_PID=${pids[-1]}; REG_PORT=$SRC; }
drop_registry() { kill "$1"; wait "$1" 2>/dev/null || true; rm -rf "$W/registry-$2"; }

walt_t=(); skopeo_t=()
run_walt() {
  new_registry "walt-$1"
  start_walt "$W/data" "$NEW_PORT"
  sync; local t0 t1; t0=$(now)
  "$BIN/walt" image publish --registry target os >/dev/null 2>"$W/publish.err" \
    || { cat "$W/publish.err" >&2; echo "walt image publish failed" >&2; exit 1; }
  t1=$(now)
  walt_t+=("$(elapsed "$t0" "$t1")")
  stop_walt
  curl -fs "http://127.0.0.1:$NEW_PORT/v2/_catalog" | grep -q '"repositories":\["' \
    || { echo "walt published nothing" >&2; exit 1; }
  drop_registry "$NEW_PID" "walt-$1"
}
run_skopeo() {
  new_registry "skopeo-$1"
  sync; local t0 t1; t0=$(now)
  skopeo copy -q --dest-tls-verify=false "oci:$W/oci:latest" "docker://127.0.0.1:$NEW_PORT/bench/os:latest"
  t1=$(now)
  skopeo_t+=("$(elapsed "$t0" "$t1")")
  drop_registry "$NEW_PID" "skopeo-$1"
}

tools=(walt skopeo)
for r in $(seq "$RUNS"); do
  for i in 0 1; do
    "run_${tools[$(( (i + r - 1) % 2 ))]}" "$r"
  done
  echo "run $r: walt ${walt_t[-1]} s  skopeo ${skopeo_t[-1]} s" >&2
done
wm=$(median "${walt_t[@]}"); sm=$(median "${skopeo_t[@]}")

echo "git revision: $(git -C "$ROOT" rev-parse --short HEAD)$(git -C "$ROOT" diff --quiet HEAD 2>/dev/null || echo ' (with local changes)'); load: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "command: bench/publish-os.sh $RUNS${WALT_BENCH_OS_TAR:+ (WALT_BENCH_OS_TAR=$WALT_BENCH_OS_TAR)}; runs: walt ${walt_t[*]} s, skopeo ${skopeo_t[*]} s"
echo
cat <<OUT
| measure ($DESC, 1 layer, $gz_mb MB gzip; median of $RUNS) | walt | reference | ratio (walt/ref) | target |
| --- | --- | --- | --- | --- |
| publish to an empty registry | ${wm} s | skopeo copy oci: → docker:// ${sm} s | $(ratio "$wm" "$sm") | <= 1.0 |
OUT
