#!/usr/bin/env bash
# A class clones at once (issue 16): USERS users (default 20) run
# `walt image clone` of the realistic OS image (bench/clone-os.sh's: make_debian_os
# in lib.sh; WALT_BENCH_OS_TAR=TAR for another root filesystem) at the same time,
# on a cold store, vs one clone alone on a cold store. Prints the medians, the
# ratio class/one (target <= 1.3) and how many GETs the registry served per blob
# during the class clone (from its access log: 1 expected).
# Every run uses a new data dir and starts with `sync`; the order of the two
# measures alternates between runs.
# Usage: bench/clone-class.sh [runs] [users]   (needs root; builds walt in release
#        mode unless WALT_BENCH_NOBUILD=1; WALT_BENCH_BIN=DIR takes the binaries
#        from DIR, e.g. target/debug for a quick check of the script)
source "$(dirname "$0")/lib.sh"
RUNS=${1:-3}
USERS=${2:-20}
BIN=${WALT_BENCH_BIN:-$BIN}
command -v mmdebstrap >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -q mmdebstrap >/dev/null
command -v pigz >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -q pigz >/dev/null
[ -n "${WALT_BENCH_NOBUILD:-}${WALT_BENCH_BIN:-}" ] || (cd "$ROOT" && cargo build --release --bins -q)

if [ -n "${WALT_BENCH_OS_TAR:-}" ]; then
  make_tar_image "$WALT_BENCH_OS_TAR"; IMAGE=$TAR_IMAGE; DESC=$(basename "$WALT_BENCH_OS_TAR")
else
  make_debian_os; IMAGE=$DEBIAN_OS; DESC="Debian $DEBIAN_OS_SUITE $DEBIAN_OS_VARIANT"
fi

# The registry of lib.sh, its access log on: every request is a line.
REG_PORT=$(free_port)
cat > "$W/registry.yml" <<YML
version: 0.1
storage: { filesystem: { rootdirectory: $W/registry }, delete: { enabled: true } }
http: { addr: 127.0.0.1:$REG_PORT }
log: { level: error, accesslog: { disabled: false } }
YML
docker-registry serve "$W/registry.yml" >"$W/registry.log" 2>&1 & pids+=($!)
wait_http "http://127.0.0.1:$REG_PORT/v2/"
push_image "$IMAGE" bench/debian-os
gz_mb=$(( $(stat -c %s "$CACHE/$IMAGE/1.tar.gz") / 1000000 ))
echo "image: $DESC, $gz_mb MB gzip; $USERS users; $RUNS runs, median kept" >&2

# GETs of blobs in the registry's access log from line $1 on: "<count> <blob>" lines.
blob_gets() {
  tail -n "+$1" "$W/registry.log" | grep -o '"GET /v2/[^ ]*/blobs/sha256:[0-9a-f]*' \
    | sed 's|.*/blobs/||' | sort | uniq -c | awk '{print $1, substr($2, 1, 19)}'
}

run_one() {
  start_walt "$W/one-$1"
  sync; local t0 t1; t0=$(now); "$BIN/walt" image clone bench:bench/debian-os >/dev/null; t1=$(now)
  one_t+=("$(elapsed "$t0" "$t1")")
  stop_walt
}

run_class() {
  start_walt "$W/class-$1"
  local i t0 t1 failed=0 cl=()
  for i in $(seq "$USERS"); do
    sed "s/username: bench/username: student$i/" "$WALT_CONFIG" > "$W/student$i.conf"
  done
  local from=$(( $(wc -l < "$W/registry.log") + 1 ))
  sync; t0=$(now)
  for i in $(seq "$USERS"); do
    WALT_CONFIG=$W/student$i.conf "$BIN/walt" image clone bench:bench/debian-os >/dev/null 2>"$W/student$i.err" & cl+=($!)
  done
  for i in "${!cl[@]}"; do wait "${cl[$i]}" || { failed=1; cat "$W/student$((i + 1)).err" >&2; }; done
  t1=$(now)
  [ "$failed" = 0 ] || { echo "a clone of the class failed" >&2; exit 1; }
  class_t+=("$(elapsed "$t0" "$t1")")
  gets=$(blob_gets "$from")
  stop_walt
}

one_t=(); class_t=()
for r in $(seq "$RUNS"); do
  if [ $((r % 2)) = 1 ]; then run_one "$r"; run_class "$r"; else run_class "$r"; run_one "$r"; fi
  echo "run $r: one clone ${one_t[-1]} s, $USERS at once ${class_t[-1]} s; blob GETs: $(echo "$gets" | tr '\n' ';')" >&2
done
om=$(median "${one_t[@]}"); cm=$(median "${class_t[@]}")
max_gets=$(echo "$gets" | awk 'BEGIN {m = 0} $1 > m {m = $1} END {print m}')

cat <<OUT
| measure ($DESC, $gz_mb MB gzip; median of $RUNS) | value | reference | ratio | target |
| --- | --- | --- | --- | --- |
| $USERS users clone at once, cold store (all done) | ${cm} s | one clone, cold store ${om} s | $(ratio "$cm" "$om") | <= 1.3 |
| GETs per blob at the registry during the class clone (last run, most) | ${max_gets} | — | — | 1 |
OUT
