#!/usr/bin/env bash
# Search benchmark (issue: every registry source). One loopback registry with
# 500 repositories x 2 tags of small labelled images:
#   walt image search (cold server, then repeated: configs cached)
#   vs. what WalT does today: catalog, tags, then one `skopeo inspect` per
#   image, sequentially.
# Also prints the CPU time the registry process spent serving each side: on
# 2 cores the registry, not walt, is the limit (see docs/performance.md).
# Usage: bench/search.sh [repos]   (needs root; builds walt in release mode)
source "$(dirname "$0")/lib.sh"
REPOS=${1:-500}
(cd "$ROOT" && cargo build --release --bins -q)
make_layers tiny dir:/etc/debian_version
# The registry's storage is kept in the cache: pushing 1000 images takes minutes.
store=$CACHE/search-registry-$REPOS
start_registry search "$store"
REG_PID=${pids[-1]}
TCK=$(getconf CLK_TCK)
reg_cpu() { awk -v t="$TCK" '{printf "%.2f", ($14+$15)/t}' "/proc/$REG_PID/stat"; }
if [ ! -f "$store.done" ]; then
  echo "pushing $REPOS repositories x 2 tags..." >&2
  for i in $(seq "$REPOS"); do
    for t in v1 v2; do
      push_image tiny "user$((i % 20))/image-$i" "$t" ",\"walt.bench\":\"$i-$t\""
    done
  done
  touch "$store.done"
fi

start_walt "$W/data"
sync; c0=$(reg_cpu); t0=$(now); n=$("$BIN/walt" image search 2>/dev/null | grep -c 'bench:'); t1=$(now)
cold=$(elapsed "$t0" "$t1"); cold_cpu=$(elapsed "$c0" "$(reg_cpu)")
c0=$(reg_cpu); t0=$(now); "$BIN/walt" image search >/dev/null 2>&1; t1=$(now)
warm=$(elapsed "$t0" "$t1"); warm_cpu=$(elapsed "$c0" "$(reg_cpu)")
stop_walt

c0=$(reg_cpu); t0=$(now)
m=$(python3 - "$REG_PORT" <<'PY'
import json, subprocess, sys, urllib.request
base = f"http://127.0.0.1:{sys.argv[1]}"
def pages(url):
    while url:
        with urllib.request.urlopen(url) as r:
            yield json.load(r)
            link = r.headers.get("Link")
        url = base + link.split(";")[0].strip("<> ") if link else None
found = 0
for page in pages(base + "/v2/_catalog"):
    for repo in page.get("repositories") or []:
        for tpage in pages(f"{base}/v2/{repo}/tags/list"):
            for tag in tpage.get("tags") or []:
                out = subprocess.run(["skopeo", "inspect", "--tls-verify=false",
                                      f"docker://127.0.0.1:{sys.argv[1]}/{repo}:{tag}"],
                                     capture_output=True, check=True).stdout
                if "walt.node.models" in json.loads(out).get("Labels", {}):
                    found += 1
print(found)
PY
)
t1=$(now); base=$(elapsed "$t0" "$t1"); base_cpu=$(elapsed "$c0" "$(reg_cpu)")

cat <<OUT
| measure ($REPOS repositories x 2 tags) | walt | baseline | speed-up | target |
| --- | --- | --- | --- | --- |
| search, cold server ($n images found; baseline $m) | ${cold} s | catalog + tags + skopeo inspect each: ${base} s | $(ratio "$base" "$cold")x | >= 20x |
| repeated search (configs cached) | ${warm} s | — | — | < 1 s |
| registry CPU time (cold / repeated / baseline) | ${cold_cpu} s / ${warm_cpu} s | ${base_cpu} s | — | — |
OUT
