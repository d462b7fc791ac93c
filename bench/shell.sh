#!/usr/bin/env bash
# Shell and cp benchmark. In one run, on the same images and the same disk:
#   time to the first prompt: `walt image shell busybox`  vs  `podman run --rm -it … /bin/sh`
#   save after changing one small file: ~430 MB image and busybox image (client and server side)
#   `walt image cp` of a ~200 MB directory into an image and back  vs  two `tar c | tar x`
# Both interactive tools are driven through a pseudo-terminal (python3 pty driver below).
# Usage: bench/shell.sh [prompt-runs] [cp-runs]   (needs root; builds walt in release mode)
# WALT_BENCH_CP_ONLY=1: only the cp part.  WALT_BENCH_PERF=1 (server) or all (every process): one more profiled cp in.
# WALT_BENCH_CP_STREAM=1: walt's cp in the API stream (WALT_CP_STREAM=1) as a third tool.
source "$(dirname "$0")/lib.sh"
RUNS=${1:-10}
CP_RUNS=${2:-4}
command -v pigz >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -q pigz >/dev/null
command -v podman >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -q podman >/dev/null
[ -x /bin/busybox ] || DEBIAN_FRONTEND=noninteractive apt-get install -y -q busybox-static >/dev/null
[ -n "${WALT_BENCH_NOBUILD:-}" ] || (cd "$ROOT" && cargo build --release --bins -q)
median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }
settle() { sync; sleep "${WALT_BENCH_SETTLE:-31}"; }
last_ms() { grep "$1" "$W/server.log" | grep -o 'elapsed_ms=[0-9.]*' | tail -1 | cut -d= -f2; }


# The ~200 MB directory for cp: regular files of /usr/share (many small ones) then of
# /usr/lib/x86_64-linux-gnu (fewer, larger), in find order, 100 MB of each.
make_tree() {
  local dir=$CACHE/cp200
  [ -f "$dir/done" ] && return 0
  echo "building the 200 MB tree" >&2
  rm -rf "$dir"; mkdir -p "$dir/tree200"
  local d
  for d in /usr/share /usr/lib/x86_64-linux-gnu; do
    { find "$d" -xdev -type f -printf '%s %p\n' || true; } \
      | awk '{ if (t >= 100000000) exit; t += $1; print substr($0, index($0, " ") + 2) }'
  done > "$W/tree.list"
  tar -C / --no-recursion -cf - -T "$W/tree.list" | tar -C "$dir/tree200" -xf -
  touch "$dir/done"
}

drive() { python3 "$ROOT/bench/ptydrive.py" "$@"; }

make_busybox
make_layers usr430 rand:100 rand:100 rand:100 dir:/usr/lib/gcc+/usr/share/doc+/usr/include
make_tree
# The ~430 MB image of bench/clone.sh has no shell: the busybox layer goes on top.
mkdir -p "$CACHE/usr430bb"
for i in 1 2 3 4; do for f in tar.gz diffid; do ln -f "$CACHE/usr430/$i.$f" "$CACHE/usr430bb/$i.$f"; done; done
for f in tar.gz diffid; do ln -f "$CACHE/busybox/1.$f" "$CACHE/usr430bb/5.$f"; done
echo 5 > "$CACHE/usr430bb/count"
start_registry
push_image busybox bench/busybox
push_image usr430bb bench/big430
start_walt "$W/data"
"$BIN/walt" image clone bench:bench/busybox >/dev/null
podman_env "$W/podman"
# crun refuses this machine's hybrid cgroup v1/v2 layout ("cgroups in hybrid mode not
# supported"): podman runs with runc. The overlay podman mounts must go before $W is removed.
trap 'podman rm -af >/dev/null 2>&1; podman rmi -af >/dev/null 2>&1; umount "$W/podman/root/overlay" 2>/dev/null || true; cleanup' EXIT
PIMG=127.0.0.1:$REG_PORT/bench/busybox:latest
podman pull -q --tls-verify=false "$PIMG" >/dev/null

CP_ONLY=${WALT_BENCH_CP_ONLY:-}
wp=(); pp=(); ws=(); bsc=(); bss=(); ssc=(); sss=()
if [ -z "$CP_ONLY" ]; then
# 1. Time to the first prompt (one untimed warm-up each, then RUNS alternating runs).
drive prompt "$BIN/walt" image shell busybox >/dev/null
drive prompt podman run --rm -it --network=none --runtime runc "$PIMG" /bin/sh >/dev/null
for r in $(seq "$RUNS"); do
  wp+=("$(drive prompt "$BIN/walt" image shell busybox)")
  ws+=("$(last_ms 'shell started')")
  pp+=("$(drive prompt podman run --rm -it --network=none --runtime runc "$PIMG" /bin/sh)")
  echo "prompt run $r: walt ${wp[-1]} ms (server ${ws[-1]} ms)  podman ${pp[-1]} ms" >&2
done

# 2. Save after changing one small file, ~430 MB image and busybox image.
"$BIN/walt" image clone bench:bench/big430 big430 >/dev/null
"$BIN/walt" image clone bench:bench/busybox bbsave >/dev/null
for r in $(seq 5); do
  sync; bsc+=("$(drive save "$BIN/walt" image shell big430)"); bss+=("$(last_ms 'session saved')")
  sync; ssc+=("$(drive save "$BIN/walt" image shell bbsave)"); sss+=("$(last_ms 'session saved')")
  echo "save run $r: big430 ${bsc[-1]} ms (server ${bss[-1]} ms)  busybox ${ssc[-1]} ms (server ${sss[-1]} ms)" >&2
done

fi

# 3. cp of a ~200 MB directory into an image and back, vs tar c | tar x twice, both
# durable: walt's copy into an image is durable when it returns (the layer is
# recorded), its copy out and each tar are followed by `sync` inside the timing.
# Fresh directories and a fresh busybox clone each run, the tool order rotated
# between runs (whichever runs first after the pause pays for memory the host took
# back), median of CP_RUNS (>= 3). Nothing is deleted until the end: on this ext4
# without a journal, creating files near inodes deleted in the last 60 s (360 s when
# their inode table block is dirty) costs up to 3x the CPU (`recently_deleted`), and
# it would fall on whichever tool runs first after the deletion. Run it at least
# 6 minutes after deleting large trees.
tree_mb=$(du -sm "$CACHE/cp200/tree200" | cut -f1)
tree_files=$(find "$CACHE/cp200/tree200" -type f | wc -l)
wi=(); wo=(); wt=(); t1s=(); t2s=(); tt=(); cr=(); wic=(); t1c=(); woc=(); t2c=()
# CPU time of every process of the machine (user + system + interrupts, from /proc/stat;
# the machine is otherwise idle): the copy in's CLI, server, sandbox and writeback, or
# both tars and theirs. Spread over the cores with perfect overlap, it is the floor of
# the copy on this machine.
TCK=$(getconf CLK_TCK); CORES=$(nproc)
busy_s() { awk -v t="$TCK" '/^cpu / { printf "%.3f", ($2+$3+$4+$7+$8)/t }' /proc/stat; }
# walt's copy: through a FIFO of the CLI's (the server runs on this machine), or, with
# `stream`, in the API stream (WALT_CP_STREAM=1: the way of a client on another machine).
cp_walt() { # run number [stream]
  local r=$1 t0 t1 t2 t3 c0 c1 c2 c3 img=cp$1 out=$W/wout$1 via=()
  if [ "${2:-}" = stream ]; then img=cps$r; out=$W/sout$r; via=(env WALT_CP_STREAM=1); fi
  sync; c0=$(busy_s); t0=$(now); "${via[@]}" "$BIN/walt" image cp "$CACHE/cp200/tree200" "$img:/root/" >/dev/null 2>"$W/cp.err" || { cat "$W/cp.err" >&2; exit 1; }; t1=$(now); c1=$(busy_s)
  sync; c2=$(busy_s); t2=$(now); "${via[@]}" "$BIN/walt" image cp "$img:/root/tree200" "$out/" >/dev/null; sync; t3=$(now); c3=$(busy_s)
  if [ "${2:-}" = stream ]; then
    si+=("$(elapsed "$t0" "$t1")"); so+=("$(elapsed "$t2" "$t3")"); sic+=("$(elapsed "$c0" "$c1")"); soc+=("$(elapsed "$c2" "$c3")")
    st+=("$(python3 -c "print(f'{${si[-1]}+${so[-1]}:.3f}')")")
    return
  fi
  wi+=("$(elapsed "$t0" "$t1")"); wo+=("$(elapsed "$t2" "$t3")"); wic+=("$(elapsed "$c0" "$c1")"); woc+=("$(elapsed "$c2" "$c3")")
  wt+=("$(python3 -c "print(f'{${wi[-1]}+${wo[-1]}:.3f}')")")
}
cp_tar() { # run number
  local r=$1 t4 t5 t6 t7 c0 c1 c2
  sync; c0=$(busy_s); t4=$(now); tar -C "$CACHE/cp200" -cf - tree200 | tar -C "$W/t1_$r" -xf -; sync; t5=$(now); c1=$(busy_s)
  t6=$(now); tar -C "$W/t1_$r" -cf - tree200 | tar -C "$W/t2_$r" -xf -; sync; t7=$(now); c2=$(busy_s)
  t1s+=("$(elapsed "$t4" "$t5")"); t2s+=("$(elapsed "$t6" "$t7")"); t1c+=("$(elapsed "$c0" "$c1")"); t2c+=("$(elapsed "$c1" "$c2")")
  tt+=("$(python3 -c "print(f'{${t1s[-1]}+${t2s[-1]}:.3f}')")")
}
# WALT_BENCH_CP_STREAM=1: walt in the API stream too, a third tool in the rotation.
STREAM_TOO=${WALT_BENCH_CP_STREAM:-}
si=(); so=(); st=(); sic=(); soc=(); sr=()
tools=(walt tar); [ -z "$STREAM_TOO" ] || tools=(walt tar stream)
for r in $(seq "$CP_RUNS"); do
  mkdir -p "$W/wout$r" "$W/sout$r" "$W/t1_$r" "$W/t2_$r"
  "$BIN/walt" image clone bench:bench/busybox "cp$r" >/dev/null
  [ -z "$STREAM_TOO" ] || "$BIN/walt" image clone bench:bench/busybox "cps$r" >/dev/null
  settle
  n=${#tools[@]}; order=()
  for i in $(seq 0 $((n - 1))); do order+=("${tools[$(( (i + r - 1) % n ))]}"); done
  for t in "${order[@]}"; do
    case $t in walt) cp_walt "$r" ;; tar) cp_tar "$r" ;; stream) cp_walt "$r" stream ;; esac
  done
  cr+=("$(ratio "${tt[-1]}" "${wt[-1]}")")
  line="cp run $r (${order[*]}): walt in ${wi[-1]}s (CPU ${wic[-1]}s) out+sync ${wo[-1]}s (CPU ${woc[-1]}s) = ${wt[-1]}s; tar+sync ${t1s[-1]}s (CPU ${t1c[-1]}s) + ${t2s[-1]}s (CPU ${t2c[-1]}s) = ${tt[-1]}s; speed ${cr[-1]}"
  if [ -n "$STREAM_TOO" ]; then
    sr+=("$(ratio "${tt[-1]}" "${st[-1]}")")
    line+="; in the stream: in ${si[-1]}s (CPU ${sic[-1]}s) out+sync ${so[-1]}s (CPU ${soc[-1]}s) = ${st[-1]}s, speed ${sr[-1]}"
  fi
  echo "$line" >&2
done
# The server's save of each copy in (its log: "session saved", image cpN or cpsN).
cp_saves=$(grep 'walt_server::session: session saved image=bench/cps\?[0-9]' "$W/server.log" | grep -o 'elapsed_ms=[0-9]*' | cut -d= -f2 | tr '\n' ' ')
if diff -r "$CACHE/cp200/tree200" "$W/wout1/tree200" >/dev/null; then same=identical; else same=DIFFERENT; fi
echo "round trip through the image: $same to the source" >&2
# WALT_BENCH_PERF=1: one more copy into an image (not counted) under `perf record`,
# and where the server's CPU time goes, by thread and by symbol (on stderr);
# WALT_BENCH_PERF=all: the same for every process of the machine.
if [ -n "${WALT_BENCH_PERF:-}" ]; then
  "$BIN/walt" image clone bench:bench/busybox cpperf >/dev/null
  settle
  # WALT_BENCH_PERF=all: every process (the CLI and the sandbox too).
  if [ "$WALT_BENCH_PERF" = all ]; then target=(-a); else target=(-p "$WALT_PID"); fi
  perf record -q -F 499 -g "${target[@]}" -o "$W/perf.data" 2>/dev/null & PERF=$!
  sleep 0.5 # perf attaches to the running server (no synchronisation is offered)
  t0=$(now); "$BIN/walt" image cp "$CACHE/cp200/tree200" "cpperf:/root/" >/dev/null; t1=$(now)
  kill -INT "$PERF"; wait "$PERF" || true
  echo "profiled cp in: $(elapsed "$t0" "$t1") s; server log: $(last_ms 'session saved') ms to save the layer" >&2
  if [ "$WALT_BENCH_PERF" = all ]; then who="CPU (every process)"; by=comm,dso,sym; else who="server CPU"; by=dso,sym; fi
  { echo "$who by thread:"; perf report -i "$W/perf.data" --stdio --no-children --sort comm -g none 2>/dev/null | grep -v '^#' | grep '%' | sed -n 1,12p
    echo "$who by symbol:"; perf report -i "$W/perf.data" --stdio --no-children --sort "$by" -g none 2>/dev/null | grep -v '^#' | grep '%' | sed -n 1,45p; } >&2
  "$BIN/walt" image remove cpperf >/dev/null
fi
# Floor of any CLI command: process start + gRPC connection + one small call.
fl=(); for r in $(seq "$RUNS"); do t0=$(now); "$BIN/walt" image show >/dev/null; t1=$(now); fl+=("$(elapsed "$t0" "$t1")"); done
[ -z "${WALT_BENCH_LOG:-}" ] || cp "$W/server.log" "$WALT_BENCH_LOG"
stop_walt

echo "bench/shell.sh $* (CP_ONLY=${CP_ONLY:-0}) at $(git -C "$ROOT" rev-parse --short HEAD)$(git -C "$ROOT" diff --quiet HEAD -- crates || echo '+changes'); load $(cut -d' ' -f1-3 /proc/loadavg)"
printf '%s\n' '| measure | walt | reference | ratio | target |' '| --- | --- | --- | --- | --- |'
[ -n "$CP_ONLY" ] || cat <<OUT
| time to prompt, busybox (median of $RUNS) | $(median "${wp[@]}") ms | podman run --rm -it $(median "${pp[@]}") ms | $(ratio "$(median "${wp[@]}")" "$(median "${pp[@]}")") | <= 0.25, < 100 ms |
| time to prompt, busybox (best of $RUNS) | $(best "${wp[@]}") ms | $(best "${pp[@]}") ms | $(ratio "$(best "${wp[@]}")" "$(best "${pp[@]}")") | |
| shell started, server side (median) | $(median "${ws[@]}") ms | — | — | |
| save after one small change, ~430 MB image (median of 5, client: y to updated.) | $(median "${bsc[@]}") ms (server $(median "${bss[@]}") ms) | — | — | < 150 ms |
| same, busybox image | $(median "${ssc[@]}") ms (server $(median "${sss[@]}") ms) | — | — | same as above |
| walt image show (CLI floor, median of $RUNS) | $(python3 -c "print(f'{$(median "${fl[@]}")*1000:.1f}')") ms | — | — | |
OUT
cat <<OUT
| cp ${tree_mb} MB / ${tree_files} files in + out, durable (median of $CP_RUNS, order rotated) | $(median "${wt[@]}") s | tar c \| tar x + sync, twice $(median "${tt[@]}") s | speed $(ratio "$(median "${tt[@]}")" "$(median "${wt[@]}")") | >= 1.0 |
| cp speed per run (tar + sync time / walt time, same run) | ${cr[*]} | — | — | >= 1.0 |
| cp in / out + sync (median) | $(median "${wi[@]}") s / $(median "${wo[@]}") s | $(median "${t1s[@]}") s / $(median "${t2s[@]}") s | | |
| cp in / out: CPU of every process (median) | $(median "${wic[@]}") s / $(median "${woc[@]}") s | tar c \| tar x + sync $(median "${t1c[@]}") s / $(median "${t2c[@]}") s | | |
| cp in / out: floor, that CPU / $CORES cores | $(python3 -c "print(f'{$(median "${wic[@]}")/$CORES:.3f}')") s / $(python3 -c "print(f'{$(median "${woc[@]}")/$CORES:.3f}')") s | tar's time $(median "${t1s[@]}") s / $(median "${t2s[@]}") s | $(ratio "$(python3 -c "print($(median "${wic[@]}")/$CORES)")" "$(median "${t1s[@]}")") / $(ratio "$(python3 -c "print($(median "${woc[@]}")/$CORES)")" "$(median "${t2s[@]}")") | |
| cp in: the server's save, ms per copy (log "session saved") | ${cp_saves} | — | — | |
| cp speed at walt's floor: tar's two times / walt's two floors | — | — | $(ratio "$(median "${tt[@]}")" "$(python3 -c "print(($(median "${wic[@]}")+$(median "${woc[@]}"))/$CORES)")") | >= 1.0 |
OUT
[ -z "$STREAM_TOO" ] || cat <<OUT
| cp in the API stream (WALT_CP_STREAM=1, a client on another machine), in + out (median) | $(median "${st[@]}") s (in $(median "${si[@]}") s, out $(median "${so[@]}") s; CPU $(median "${sic[@]}") s / $(median "${soc[@]}") s) | tar $(median "${tt[@]}") s | speed $(ratio "$(median "${tt[@]}")" "$(median "${st[@]}")") (runs ${sr[*]}) | — |
OUT
