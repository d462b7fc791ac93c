#!/usr/bin/env bash
# Search benchmark (issue 14). One registry with REPOS repositories x 2 tags of
# small labelled images (default 500 x 2 = 1 000 tags), searched two ways:
#   walt image search (cold server, then repeated: configs cached)
#   vs. what WalT does today: catalog, tags, then one `skopeo inspect` per
#   tag, sequentially;
# each on two links to the registry:
#   loopback, and the same registry behind a round trip of RTT_MS (default 20)
#   added by the test proxy's latency mode (tests/src/bin/walt-latency-proxy.rs:
#   every byte delayed RTT/2 each way, new connections pay their handshake).
# Both tools go through the same link. A fresh server (empty caches) per cold
# search, the order of the tools rotated between runs, medians of RUNS.
# Also prints the CPU time the registry process spent serving each search,
# walt's cold loopback wall time against that CPU time spread on the cores
# (target <= 1.3), and the peak RSS of walt-server and of the CLI during the
# cold search (server: VmHWM after clear_refs; CLI: /usr/bin/time).
# Usage: bench/search.sh [repos [runs]]   (needs root; builds walt in release
#        mode unless WALT_BENCH_NOBUILD=1; WALT_BENCH_RTT_MS sets the round trip;
#        WALT_BENCH_LINKS="loopback latency" which links to measure;
#        WALT_BENCH_TOOLS="walt base" which sides to run)
source "$(dirname "$0")/lib.sh"
REPOS=${1:-500}
RUNS=${2:-3}
RTT_MS=${WALT_BENCH_RTT_MS:-20}
LINKS=${WALT_BENCH_LINKS:-loopback latency}
TOOLS=${WALT_BENCH_TOOLS:-walt base}
command -v skopeo >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -q skopeo >/dev/null
[ -x /usr/bin/time ] || DEBIAN_FRONTEND=noninteractive apt-get install -y -q time >/dev/null
if [ -z "${WALT_BENCH_NOBUILD:-}" ]; then
  (cd "$ROOT" && cargo build --release --bins -q && cargo build --release -q -p walt-e2e --bin walt-latency-proxy)
fi
make_layers tiny dir:/etc/debian_version
# The registry's storage is kept in the cache: pushing 1000 images takes minutes.
store=$CACHE/search-registry-$REPOS
start_registry search "$store"
REG_PID=${pids[-1]}
LOOP_PORT=$REG_PORT
TCK=$(getconf CLK_TCK)
CORES=$(nproc)
cpu_s() { awk -v t="$TCK" '{printf "%.2f", ($14+$15)/t}' "/proc/$1/stat"; } # user+system CPU of PID
if [ ! -f "$store.done" ]; then
  echo "pushing $REPOS repositories x 2 tags..." >&2
  for i in $(seq "$REPOS"); do
    for t in v1 v2; do
      push_image tiny "user$((i % 20))/image-$i" "$t" ",\"walt.bench\":\"$i-$t\""
    done
  done
  touch "$store.done"
fi
EXPECTED=$((REPOS * 2))

# The latency link: the proxy in front of the same registry.
"$ROOT/target/release/walt-latency-proxy" "$RTT_MS" "$LOOP_PORT" > "$W/proxy.port" & pids+=($!)
for _ in $(seq 200); do [ -s "$W/proxy.port" ] && break; sleep 0.05; done
LAT_PORT=$(head -1 "$W/proxy.port")
wait_http "http://127.0.0.1:$LAT_PORT/v2/"
port_of() { if [ "$1" = loopback ]; then echo "$LOOP_PORT"; else echo "$LAT_PORT"; fi; }

declare -A T   # T[link,what] = space-separated values, one per run
add() { T[$1]="${T[$1]:-} $2"; }
med() { median ${T[$1]}; }
cell() { if [ -n "${T[$1]:-}" ]; then echo "$(med "$1") s"; else echo —; fi; } # a median, with its unit

run_walt() { # LINK RUN
  local link=$1 port; port=$(port_of "$1")
  REG_PORT=$port start_walt "$W/data-$link-$2"
  sync
  echo 5 > "/proc/$WALT_PID/clear_refs"
  local c0 s0 t0 t1 n
  c0=$(cpu_s "$REG_PID"); s0=$(cpu_s "$WALT_PID"); t0=$(now)
  /usr/bin/time -f '%M %U %S' -o "$W/cli-time" "$BIN/walt" image search > "$W/search.out" 2>"$W/search.err"
  t1=$(now)
  n=$(grep -c 'bench:' "$W/search.out" || true)
  [ "$n" = "$EXPECTED" ] || { cat "$W/search.err" >&2; echo "walt found $n images, not $EXPECTED" >&2; exit 1; }
  add "$link,cold" "$(elapsed "$t0" "$t1")"
  add "$link,cold_cpu" "$(elapsed "$c0" "$(cpu_s "$REG_PID")")"
  add "$link,server_cpu" "$(elapsed "$s0" "$(cpu_s "$WALT_PID")")"
  add "$link,server_rss" "$(peak_rss_mb "$WALT_PID")"
  read -r rss u s < "$W/cli-time"
  add "$link,cli_rss" "$(awk -v k="$rss" 'BEGIN {printf "%.1f", k/1024}')"
  add "$link,cli_cpu" "$(python3 -c "print(f'{$u+$s:.2f}')")"
  c0=$(cpu_s "$REG_PID"); t0=$(now); "$BIN/walt" image search >/dev/null 2>&1; t1=$(now)
  add "$link,warm" "$(elapsed "$t0" "$t1")"
  add "$link,warm_cpu" "$(elapsed "$c0" "$(cpu_s "$REG_PID")")"
  stop_walt
  rm -rf "$W/data-$link-$2"
  echo "run $2, $link: walt cold $(echo ${T[$link,cold]} | awk '{print $NF}') s, repeated $(echo ${T[$link,warm]} | awk '{print $NF}') s" >&2
}

run_base() { # LINK RUN
  local link=$1 port c0 t0 t1 m; port=$(port_of "$1")
  c0=$(cpu_s "$REG_PID"); t0=$(now)
  m=$(python3 - "$port" <<'PY'
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
  t1=$(now)
  [ "$m" = "$EXPECTED" ] || { echo "the baseline found $m images, not $EXPECTED" >&2; exit 1; }
  add "$link,base" "$(elapsed "$t0" "$t1")"
  add "$link,base_cpu" "$(elapsed "$c0" "$(cpu_s "$REG_PID")")"
  echo "run $2, $link: baseline $(echo ${T[$link,base]} | awk '{print $NF}') s" >&2
}

read -ra tools <<< "$TOOLS"
for r in $(seq "$RUNS"); do
  for link in $LINKS; do
    for i in "${!tools[@]}"; do
      "run_${tools[$(( (i + r - 1) % ${#tools[@]} ))]}" "$link" "$r"
    done
  done
done

echo "git revision: $(git -C "$ROOT" rev-parse --short HEAD)$(git -C "$ROOT" diff --quiet HEAD 2>/dev/null || echo ' (with local changes)'); load: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "command: bench/search.sh $REPOS $RUNS (WALT_BENCH_RTT_MS=$RTT_MS); $CORES cores; medians of $RUNS runs"
echo
echo "| measure ($REPOS repositories x 2 tags, $EXPECTED images) | walt | baseline: catalog + tags + skopeo inspect each | speed-up | target |"
echo "| --- | --- | --- | --- | --- |"
for link in $LINKS; do
  if [ "$link" = loopback ]; then what="loopback"; target=""; else what="behind a $RTT_MS ms round trip"; target=">= 20x"; fi
  speedup=—; [ -z "${T[$link,base]:-}" ] || [ -z "${T[$link,cold]:-}" ] || speedup="$(ratio "$(med "$link,base")" "$(med "$link,cold")")x"
  echo "| search $what, cold server | $(cell "$link,cold") | $(cell "$link,base") | $speedup | ${target:-—} |"
  if [ -n "${T[$link,cold]:-}" ]; then
    echo "| repeated search $what (configs cached) | $(cell "$link,warm") | — | — | — |"
    echo "| registry CPU time $what (cold / repeated / baseline) | $(cell "$link,cold_cpu") / $(cell "$link,warm_cpu") | $(cell "$link,base_cpu") | — | — |"
    echo "| walt-server / CLI CPU time, cold search $what | $(cell "$link,server_cpu") / $(cell "$link,cli_cpu") | — | — | — |"
    echo "| peak RSS during the cold search $what (server / CLI) | $(med "$link,server_rss") MB / $(med "$link,cli_rss") MB | — | — | < 150 MB each |"
  else
    echo "| registry CPU time of the baseline $what | — | $(cell "$link,base_cpu") | — | — |"
  fi
done
if [[ " $LINKS " == *" loopback "* && -n "${T[loopback,cold]:-}" ]]; then
  share=$(python3 -c "print(f'{$(med loopback,cold_cpu)/$CORES:.3f}')")
  echo "| cold search on loopback vs the registry's CPU time / $CORES cores ($share s) | $(med loopback,cold) s | — | $(ratio "$(med loopback,cold)" "$share") | <= 1.3 |"
fi
