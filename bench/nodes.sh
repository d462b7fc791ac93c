#!/usr/bin/env bash
# Node burst benchmark (issue 13). On one loopback registry holding
# waltplatform/pc-x86-64-default:latest, cold store each time:
#   50 nodes of that new model report their lease at once (50 walt-dhcp-event
#   run together, as a DHCP server's hook runs them), timed from the first
#   event to all 50 "node ready"
#   vs  one `walt image clone` of the same image from the same registry.
# "Node ready": the device is a node booting the default image and its tree
# `<data-dir>/nodes/<mac>/fs` shows the image's root (mounted and linked), or
# with READY=db (no serving yet) only the node record in the store.
# Image: the Debian bookworm minbase of bench/build.sh when cached (or
# BASE=debian to build it), else BASE=busybox.
# Usage: [BASE=debian|busybox] [READY=fs|db] bench/nodes.sh [runs]
#   (needs root; builds walt in release mode unless WALT_BENCH_NOBUILD=1)
source "$(dirname "$0")/lib.sh"
RUNS=${1:-3}
NODES=${NODES:-50}
READY=${READY:-fs}
if [ -z "${BASE:-}" ]; then
  if [ -f "$CACHE/debian-bookworm-minbase/done" ]; then BASE=debian; else BASE=busybox; fi
fi
case $BASE in busybox|debian) ;; *) echo "BASE must be busybox or debian" >&2; exit 2;; esac
case $READY in fs|db) ;; *) echo "READY must be fs or db" >&2; exit 2;; esac
command -v pigz >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -q pigz >/dev/null
[ "$BASE" = busybox ] || [ -f "$CACHE/debian-bookworm-minbase/done" ] || command -v mmdebstrap >/dev/null \
  || DEBIAN_FRONTEND=noninteractive apt-get install -y -q mmdebstrap >/dev/null
[ -n "${WALT_BENCH_NOBUILD:-}" ] || (cd "$ROOT" && cargo build --release --bins -q)
[ -x "$BIN/walt-dhcp-event" ] || { echo "$BIN/walt-dhcp-event missing" >&2; exit 1; }

if [ "$BASE" = debian ]; then make_debian; IMG=debian-bookworm-minbase; else make_busybox; IMG=busybox; fi

start_registry
push_image "$IMG" waltplatform/pc-x86-64-default
size=$(du -cb "$CACHE/$IMG"/*.tar.gz | tail -1 | cut -f1)
echo "image: $IMG, $(cat "$CACHE/$IMG/count") layer(s), $((size/1000000)) MB compressed; $NODES nodes; $RUNS runs each" >&2

# Where the server and the hook meet, and what the server writes (never the
# host's /run/walt or /etc/exports.d).
export WALT_DHCP_EVENT_SOCKET=$W/dhcp-event.sock WALT_EXPORTS_FILE=$W/walt.exports

# burst DATA_DIR RUN MACS...: starts the NODES hooks at once (from the poller
# itself, so that its own start-up is outside the measured time), then polls
# (every 10 ms) until every node is ready; prints the seconds since the
# first hook was started.
burst() {
  local data=$1 run=$2; shift 2
  python3 - "$data" "$READY" "$BIN/walt-dhcp-event" "$run" "$@" <<'PY'
import os, sqlite3, subprocess, sys, time
data, ready, hook, run, macs = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5:]
want = "waltplatform/pc-x86-64-default:latest"
t0 = time.time()
hooks = [subprocess.Popen([hook, "commit", "walt.node.pc-x86-64", "", f"192.168.152.{i + 11}",
                           m, "", "0", "unknown"]) for i, m in enumerate(macs)]
deadline = time.time() + 600
db = None
while True:
    try:
        if db is None:
            db = sqlite3.connect(f"file:{data}/walt.db?mode=ro", uri=True, timeout=5)
        rows = db.execute(
            "SELECT d.mac FROM devices d JOIN nodes n ON n.mac = d.mac "
            "JOIN images i ON i.id = n.image_id "
            "WHERE i.owner || '/' || i.name || ':' || i.tag = ?", (want,)).fetchall()
        nodes = {r[0] for r in rows}
        failed = db.execute(
            "SELECT name, reason FROM devices WHERE type = 'unknown' "
            "AND reason LIKE '%not available%'").fetchall()
        if failed:
            sys.exit(f"not a node: {failed[0][0]}: {failed[0][1]}")
    except sqlite3.Error:
        nodes = set()
    if all(m in nodes for m in macs) and (
            ready == "db" or all(os.path.isdir(f"{data}/nodes/{m}/fs/etc") for m in macs)):
        print(f"{time.time() - t0:.3f}")
        break
    if time.time() > deadline:
        sys.exit(f"timed out: {len(nodes)} of {len(macs)} nodes")
    time.sleep(0.01)
for h in hooks:
    if h.wait() != 0:
        sys.exit(f"a hook failed: exit {h.returncode}")
PY
}

clone_t=(); burst_t=()
for r in $(seq "$RUNS"); do
  start_walt "$W/data-clone-$r"
  sync; t0=$(now); "$BIN/walt" image clone bench:waltplatform/pc-x86-64-default >/dev/null; t1=$(now)
  clone_t+=("$(elapsed "$t0" "$t1")")
  stop_walt

  start_walt "$W/data-nodes-$r"
  for _ in $(seq 200); do [ -S "$WALT_DHCP_EVENT_SOCKET" ] && break; sleep 0.05; done
  macs=()
  for i in $(seq "$NODES"); do macs+=("$(printf '52:54:00:be:%02x:%02x' "$r" "$i")"); done
  sync
  burst_t+=("$(burst "$W/data-nodes-$r" "$r" "${macs[@]}")")
  stop_walt
  echo "run $r: clone ${clone_t[-1]}s  $NODES nodes ready ${burst_t[-1]}s  (ratio $(ratio "${burst_t[-1]}" "${clone_t[-1]}"))" >&2
done
cb=$(best "${clone_t[@]}"); bb=$(best "${burst_t[@]}")
cm=$(median "${clone_t[@]}"); bm=$(median "${burst_t[@]}")

cat <<OUT
| measure | $NODES-node burst | walt image clone | ratio (burst/clone) | target |
| --- | --- | --- | --- | --- |
| $IMG default image, first event to all ready ($READY), best of $RUNS | ${bb} s | ${cb} s | $(ratio "$bb" "$cb") | <= 1.10 |
| same, median of $RUNS | ${bm} s | ${cm} s | $(ratio "$bm" "$cm") | <= 1.10 |
OUT
