#!/usr/bin/env bash
# Clone benchmark (issue: foundation). On one loopback registry, cold store each time:
#   walt image clone  vs  skopeo copy docker://… oci:…  vs  podman pull
# plus re-clone of a fully stored image under a new name (server side),
# and the server's peak RSS while cloning a ~1 GB image.
# Each timed command starts with no dirty pages (sync first), so no tool pays
# for another's writeback.
# Usage: bench/clone.sh [runs]   (needs root; builds walt in release mode)
source "$(dirname "$0")/lib.sh"
RUNS=${1:-3}
command -v pigz >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -q pigz >/dev/null
command -v podman >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -q podman >/dev/null
(cd "$ROOT" && cargo build --release --bins -q)

make_layers usr430 rand:100 rand:100 rand:100 dir:/usr/lib/gcc+/usr/share/doc+/usr/include
make_layers big1g rand:100 rand:100 rand:100 rand:100 rand:100 rand:100 rand:100 rand:100 rand:100 rand:100
start_registry
push_image usr430 bench/big430
push_image big1g bench/big1g
size=$(du -cb "$CACHE"/usr430/*.tar.gz | tail -1 | cut -f1)
echo "image: 4 layers, $((size/1000000)) MB compressed; $RUNS runs each, best kept" >&2

# Cold stores: every run writes into new, empty directories and nothing is
# deleted until the end. Deleting a store just before a timed command would
# make it pay for the deletion: ext4 without a journal (as here) checks every
# inode it allocates against those deleted in the last 60 s (360 s while
# their inode table block is dirty), and the memory freed goes back to the
# hypervisor, which makes it slow to touch again (see docs/performance.md).
walt_t=(); skopeo_t=(); podman_t=()
for r in $(seq "$RUNS"); do
  start_walt "$W/data-$r"
  sync; t0=$(now); "$BIN/walt" image clone bench:bench/big430 >/dev/null; t1=$(now)
  walt_t+=("$(elapsed "$t0" "$t1")")
  stop_walt

  sync; t0=$(now); skopeo copy -q --src-tls-verify=false "docker://127.0.0.1:$REG_PORT/bench/big430:latest" "oci:$W/oci-$r:latest"; t1=$(now)
  skopeo_t+=("$(elapsed "$t0" "$t1")")

  podman_env "$W/podman-$r"
  sync; t0=$(now); podman pull -q --tls-verify=false "127.0.0.1:$REG_PORT/bench/big430:latest" >/dev/null; t1=$(now)
  podman_t+=("$(elapsed "$t0" "$t1")")
  echo "run $r: walt ${walt_t[-1]}s  skopeo ${skopeo_t[-1]}s  podman ${podman_t[-1]}s  (walt/skopeo $(ratio "${walt_t[-1]}" "${skopeo_t[-1]}"), walt/podman $(ratio "${walt_t[-1]}" "${podman_t[-1]}"))" >&2
done
wb=$(best "${walt_t[@]}"); sb=$(best "${skopeo_t[@]}"); pb=$(best "${podman_t[@]}")
wm=$(median "${walt_t[@]}"); sm=$(median "${skopeo_t[@]}"); pm=$(median "${podman_t[@]}")

# Re-clone under a new name: every layer already stored.
start_walt "$W/data-again"
"$BIN/walt" image clone bench:bench/big430 >/dev/null
re=()
for r in $(seq 5); do
  "$BIN/walt" image clone bench:bench/big430 "again-$r" >/dev/null
  re+=("$(grep -o 'elapsed_ms=[0-9.]*' "$W/server.log" | tail -1 | cut -d= -f2)")
done
stop_walt

# Peak RSS of the server while cloning the ~1 GB image.
start_walt "$W/data-1g"
sync; t0=$(now); "$BIN/walt" image clone bench:bench/big1g >/dev/null; t1=$(now)
rss=$(peak_rss_mb "$WALT_PID"); t1g=$(elapsed "$t0" "$t1")
stop_walt

cat <<OUT
| measure | walt | reference | ratio (walt/ref) | target |
| --- | --- | --- | --- | --- |
| clone of the ~$((size/1000000)) MB 4-layer image, best of $RUNS | ${wb} s | podman pull ${pb} s | $(ratio "$wb" "$pb") | <= 0.40 |
| same | ${wb} s | skopeo copy to oci: ${sb} s | $(ratio "$wb" "$sb") | <= 1.20 |
| same, median of $RUNS | ${wm} s | podman pull ${pm} s | $(ratio "$wm" "$pm") | <= 0.40 |
| same | ${wm} s | skopeo copy to oci: ${sm} s | $(ratio "$wm" "$sm") | <= 1.20 |
| re-clone, all layers stored (server side) | $(best "${re[@]}") ms | — | — | < 50 ms |
| server peak RSS, clone of 1 GB image (${t1g} s) | ${rss} MB | — | — | < 100 MB |
OUT
