#!/usr/bin/env bash
# The cost of making N small new files durable one by one (fsync each, then their
# directory) against one flush of the filesystem (syncfs), on the disk of the store
# ($CACHE's filesystem): what sets walt_store's SYNC_EACH_MAX (staging.rs).
# Usage: bench/fsync.sh [N...]   (default 16 32 64 256)
source "$(dirname "$0")/lib.sh"
python3 - "$W" "${@:-16 32 64 256}" <<'PY'
import os, sys, time, ctypes
libc = ctypes.CDLL(None, use_errno=True)
def syncfs(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        if libc.syncfs(fd) != 0:
            raise OSError(ctypes.get_errno(), "syncfs")
    finally:
        os.close(fd)
def make(d, n):
    os.makedirs(d)
    for i in range(n):
        with open(f"{d}/f{i}", "w") as f:
            f.write("x" * 2000)
w = sys.argv[1]
syncfs(w)
print("| files | fsync each + directory | one syncfs |")
print("| --- | --- | --- |")
for n in map(int, " ".join(sys.argv[2:]).split()):
    d = f"{w}/each{n}"; make(d, n); t = time.monotonic()
    for i in range(n):
        fd = os.open(f"{d}/f{i}", os.O_RDONLY); os.fsync(fd); os.close(fd)
    fd = os.open(d, os.O_RDONLY); os.fsync(fd); os.close(fd)
    each = time.monotonic() - t
    d = f"{w}/fs{n}"; make(d, n); t = time.monotonic()
    syncfs(d)
    whole = time.monotonic() - t
    print(f"| {n} | {each*1000:.1f} ms ({each*1000/n:.2f} ms per file) | {whole*1000:.1f} ms |")
PY
