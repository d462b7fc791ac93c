#!/usr/bin/env bash
# Publish benchmark (issue: every registry source), loopback registries:
#   walt image publish of the ~445 MB 4-layer image to an empty registry
#   vs. skopeo copy oci:… docker://… of the same image to another empty one;
#   and walt image publish when every blob is already there.
# Usage: bench/publish.sh   (needs root; builds walt in release mode)
source "$(dirname "$0")/lib.sh"
(cd "$ROOT" && cargo build --release --bins -q)
make_layers usr430 rand:100 rand:100 rand:100 dir:/usr/lib/gcc+/usr/share/doc+/usr/include
start_registry src; SRC=$REG_PORT
push_image usr430 bench/big430
start_registry walt; DST=$REG_PORT
start_registry skopeo; SKO=$REG_PORT
REG_PORT=$SRC

start_walt "$W/data" "$DST"
"$BIN/walt" image clone bench:bench/big430 >/dev/null
skopeo copy -q --src-tls-verify=false "docker://127.0.0.1:$SRC/bench/big430:latest" "oci:$W/oci:latest"

sync; t0=$(now); "$BIN/walt" image publish --registry target big430 >/dev/null 2>&1; t1=$(now)
wp=$(elapsed "$t0" "$t1")
sync; t0=$(now); skopeo copy -q --dest-tls-verify=false "oci:$W/oci:latest" "docker://127.0.0.1:$SKO/bench/big430:latest"; t1=$(now)
sp=$(elapsed "$t0" "$t1")
again=()
for r in 1 2 3 4 5; do
  t0=$(now); "$BIN/walt" image publish --registry target big430 >/dev/null 2>&1; t1=$(now)
  again+=("$(elapsed "$t0" "$t1")")
done
stop_walt

cat <<OUT
| measure | walt | reference | ratio | target |
| --- | --- | --- | --- | --- |
| publish of the 445 MB 4-layer image to an empty registry | ${wp} s | skopeo copy oci: → docker:// ${sp} s | $(ratio "$wp" "$sp") | <= 1.0 |
| publish again, every blob already there (client wall time) | $(best "${again[@]}") s | — | — | < 0.15 s |
OUT
