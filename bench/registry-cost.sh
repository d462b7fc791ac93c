#!/usr/bin/env bash
# The registry's own CPU time per request, by kind (the floor under a search:
# docs/performance.md, "Search"). One loopback docker-registry (the bench's
# settings: level error, no access log) holding one small labelled image; each
# kind of request is sent N times, one at a time, on one keep-alive connection,
# and the registry process's user + system CPU time is read before and after.
# Usage: bench/registry-cost.sh [N]   (default 500; needs docker-registry, python3)
source "$(dirname "$0")/lib.sh"
N=${1:-500}
make_layers tiny dir:/etc/debian_version
start_registry cost; REG_PID=${pids[-1]}
push_image tiny bench/tiny
python3 - "$REG_PORT" "$REG_PID" "$N" <<'PY'
import http.client, json, os, sys
port, pid, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
tck = os.sysconf("SC_CLK_TCK")
def cpu():
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / tck  # utime, stime
c = http.client.HTTPConnection("127.0.0.1", int(port))
def req(method, path, headers=None):
    c.request(method, path, headers=headers or {})
    r = c.getresponse(); body = r.read(); return r.status, r.headers, body
MT = "application/vnd.oci.image.manifest.v1+json"
st, h, body = req("GET", "/v2/bench/tiny/manifests/latest", {"Accept": MT})
digest = h["Docker-Content-Digest"]; config = json.loads(body)["config"]["digest"]
kinds = [
    ("GET /v2/", "GET", "/v2/", {}),
    ("a path no route matches (404 from the router)", "GET", "/v2/_nothing/here", {}),
    ("GET /v2/<repo>/tags/list", "GET", "/v2/bench/tiny/tags/list", {}),
    ("GET manifest by tag", "GET", "/v2/bench/tiny/manifests/latest", {"Accept": MT}),
    ("HEAD manifest by tag", "HEAD", "/v2/bench/tiny/manifests/latest", {"Accept": MT}),
    ("conditional GET of the manifest answered 304", "GET", "/v2/bench/tiny/manifests/latest",
     {"Accept": MT, "If-None-Match": f'"{digest}"'}),
    ("GET config blob (~200 bytes)", "GET", f"/v2/bench/tiny/blobs/{config}", {}),
    ("HEAD blob", "HEAD", f"/v2/bench/tiny/blobs/{config}", {}),
]
print(f"| request ({n} one at a time, one keep-alive connection) | status | registry CPU per request |")
print("| --- | --- | --- |")
for name, method, path, headers in kinds:
    for _ in range(20):  # warm-up
        req(method, path, headers)
    c0 = cpu()
    for _ in range(n):
        st, _, _ = req(method, path, headers)
    print(f"| {name} | {st} | {(cpu() - c0) / n * 1000:.2f} ms |")
PY
