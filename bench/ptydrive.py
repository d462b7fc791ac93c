# pty driver of the shell benchmarks (bench/shell.sh, bench/publish-shell.sh).
#   prompt CMD...    ms from spawn to the first "# " on the pty, then `exit`
#                    (walt must say "No changes").
#   save CMD...      at the prompt changes one file and exits, answers Enter
#                    then y; prints ms from sending "y\n" to "updated.".
#   run LINE CMD...  the same with LINE as the change (up to 600 s each step).
import os, pty, sys, time, select, struct, fcntl, termios
mode = sys.argv[1]
if mode == "run":
    line, cmd, timeout = sys.argv[2].encode(), sys.argv[3:], 600
else:
    line, cmd, timeout = b"echo x > /root/f", sys.argv[2:], 60
buf = b""
def read_until(fd, pat):
    global buf
    end = time.monotonic() + timeout
    while pat not in buf:
        r, _, _ = select.select([fd], [], [], max(0, end - time.monotonic()))
        if not r:
            sys.exit(f"timeout waiting for {pat!r}; output so far: {buf[-2000:]!r}")
        try:
            d = os.read(fd, 65536)
        except OSError:
            d = b""
        if not d:
            sys.exit(f"EOF waiting for {pat!r}; output: {buf[-2000:]!r}")
        buf += d
    buf = buf[buf.index(pat) + len(pat):]
def drain(fd):
    global buf
    while True:
        r, _, _ = select.select([fd], [], [], 60)
        if not r:
            return
        try:
            d = os.read(fd, 65536)
        except OSError:
            return
        if not d:
            return
        buf += d
def wait_ok(pid):
    _, st = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(st) != 0:
        sys.exit(f"exit status {st}; output: {buf!r}")
os.environ["TERM"] = "xterm"
t0 = time.monotonic()
pid, fd = pty.fork()
if pid == 0:
    fcntl.ioctl(0, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    os.execvp(cmd[0], cmd)
read_until(fd, b"# ")
t1 = time.monotonic()
if mode == "prompt":
    os.write(fd, b"exit\n")
    drain(fd)
    wait_ok(pid)
    if "walt" in os.path.basename(cmd[0]) and b"No changes" not in buf:
        sys.exit(f"walt did not say 'No changes': {buf!r}")
    print(f"{(t1 - t0) * 1000:.1f}")
else:
    os.write(fd, line + b"; exit\n")
    read_until(fd, b"(Enter: ")
    read_until(fd, b": ")
    os.write(fd, b"\n")
    read_until(fd, b"(y/n): ")
    t2 = time.monotonic()
    os.write(fd, b"y\n")
    read_until(fd, b"updated.")
    t3 = time.monotonic()
    drain(fd)
    wait_ok(pid)
    print(f"{(t3 - t2) * 1000:.1f}")
