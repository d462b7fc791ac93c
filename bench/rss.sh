#!/usr/bin/env bash
# Peak memory (issue 14): peak RSS of walt-server and of the `walt` CLI during a
# clone, a publish, a search and a build of the Debian OS image of
# bench/clone-os.sh (make_debian_os in lib.sh, ~430 MB, 13 000+ files).
# Server: VmHWM of /proc/<pid>/status, reset before each operation by writing 5
# to /proc/<pid>/clear_refs (so each row is that operation's own peak, on one
# server). CLI: /usr/bin/time's maximum resident set size.
# Target: < 150 MB each (documented, not asserted). The peaks during a search of
# a 1 000-image registry are printed by bench/search.sh.
# Usage: bench/rss.sh   (needs root; builds walt in release mode unless
#        WALT_BENCH_NOBUILD=1)
source "$(dirname "$0")/lib.sh"
command -v mmdebstrap >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -q mmdebstrap >/dev/null
command -v pigz >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -q pigz >/dev/null
[ -x /usr/bin/time ] || DEBIAN_FRONTEND=noninteractive apt-get install -y -q time >/dev/null
[ -n "${WALT_BENCH_NOBUILD:-}" ] || (cd "$ROOT" && cargo build --release --bins -q)

# WALT_BENCH_OS_TAR=TAR: the image is that root filesystem tarball instead (see
# bench/clone-os.sh).
if [ -n "${WALT_BENCH_OS_TAR:-}" ]; then
  make_tar_image "$WALT_BENCH_OS_TAR"; DEBIAN_OS=$TAR_IMAGE; DESC=$(basename "$WALT_BENCH_OS_TAR")
else
  make_debian_os; DESC="Debian $DEBIAN_OS_SUITE $DEBIAN_OS_VARIANT"
fi
start_registry target; DST=$REG_PORT
start_registry src
push_image "$DEBIAN_OS" bench/debian-os
start_walt "$W/data" "$DST"

rows=()
# measure LABEL CMD...: runs the CLI command, records both peaks and the wall time.
measure() {
  local label=$1 t0 t1; shift
  echo 5 > "/proc/$WALT_PID/clear_refs"
  sync; t0=$(now)
  /usr/bin/time -f %M -o "$W/cli-rss" "$BIN/walt" "$@" >"$W/cli.out" 2>&1 \
    || { cat "$W/cli.out" >&2; echo "walt $* failed" >&2; exit 1; }
  t1=$(now)
  local srv cli
  srv=$(peak_rss_mb "$WALT_PID")
  cli=$(awk '{printf "%.1f", $1/1024}' "$W/cli-rss")
  rows+=("| $label | $srv MB | $cli MB | $(elapsed "$t0" "$t1") s |")
  echo "$label: server $srv MB, CLI $cli MB" >&2
}

idle=$(peak_rss_mb "$WALT_PID")
measure "clone of the image (cold store)" image clone bench:bench/debian-os os
measure "publish to an empty registry" image publish --registry target os
measure "search (2 registries, 2 images)" image search
grep -q debian-os "$W/cli.out" || { cat "$W/cli.out" >&2; echo "search did not find the image" >&2; exit 1; }
# The build context: 20 MB of incompressible data in 1 000 files.
CTX=$W/ctx; mkdir -p "$CTX/data"
head -c $((1000 * 20480)) /dev/urandom > "$W/rand"
split -a 3 -d -b 20480 "$W/rand" "$CTX/data/f"; rm -f "$W/rand"
cat > "$CTX/Dockerfile" <<'DF'
FROM os
COPY data /data
RUN mkdir /gen && for i in $(seq 1 500); do echo "line $i" > /gen/f$i; done
RUN cp -a /usr/share/doc /gen/doc
DF
measure "build (FROM the image; COPY of 20 MB in 1 000 files, 2 RUN steps)" image build --from-dir "$CTX" --yes os-built
[ -z "${WALT_BENCH_LOG:-}" ] || cp "$W/server.log" "$WALT_BENCH_LOG"
stop_walt

cat <<OUT
| operation ($DESC image; server idle peak $idle MB) | walt-server peak RSS | walt CLI peak RSS | wall time | target |
| --- | --- | --- | --- | --- |
$(printf '%s\n' "${rows[@]}" | sed 's/ |$/ | < 150 MB each |/')
OUT
