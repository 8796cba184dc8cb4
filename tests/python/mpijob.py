"""Helpers for multi-process tests: real ckpt-engine ranks under mpirun and real
ckpt-worker processes, on this machine."""
import json
import os
import signal
import struct
import subprocess
import sys
import time

BUILD = os.environ.get("CKPT_BUILD_DIR", os.path.join(os.path.dirname(__file__), "../../build/release"))
ENGINE = os.path.join(BUILD, "tools", "ckpt-engine")
WORKER = os.path.join(BUILD, "tools", "ckpt-worker")

MPI_ENV = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               OMPI_MCA_rmaps_base_oversubscribe="1")


def http_request(port, method, path, body=None, token=None, raw=None, headers=None,
                 decode=False):
    """One request to 127.0.0.1:port: (status, parsed JSON) for JSON replies, else (status,
    bytes, or text with decode)."""
    import http.client
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    h = dict(headers or {})
    if token:
        h["Authorization"] = "Bearer " + token
    data = raw if raw is not None else (json.dumps(body) if body is not None else None)
    conn.request(method, path, body=data, headers=h)
    resp = conn.getresponse()
    payload = resp.read()
    conn.close()
    if resp.getheader("Content-Type", "").startswith("application/json"):
        return resp.status, json.loads(payload)
    return resp.status, payload.decode(errors="replace") if decode else payload


def read_safetensors(path):
    """Minimal reader for test assertions: {name: (dtype, shape, bytes)}."""
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    out = {}
    for name, t in header.items():
        if name == "__metadata__":
            continue
        b, e = t["data_offsets"]
        out[name] = (t["dtype"], tuple(t["shape"]), data[8 + n + b:8 + n + e])
    return out


def read_checkpoint(path):
    """All tensors of a file or a directory of .safetensors files."""
    files = [path] if os.path.isfile(path) else sorted(
        os.path.join(path, f) for f in os.listdir(path) if f.endswith(".safetensors"))
    out = {}
    for f in files:
        out.update(read_safetensors(f))
    return out


def assert_worker_equals(dep, r, model_path):
    """Worker r's dump holds exactly the checkpoint's tensors, byte for byte."""
    got = read_checkpoint(dep.worker_dump(r))
    want = read_checkpoint(model_path)
    assert set(got) == set(want)
    for name, (dt, shape, data) in want.items():
        assert got[name][0] == dt and got[name][1] == shape, name
        assert got[name][2] == data, "worker %d: tensor %s differs" % (r, name)
    return True


def gen(tmp_path, size="8MiB", layers=2, shards=2, name="model", experts=0):
    out = os.path.join(str(tmp_path), name)
    subprocess.run([ENGINE, "gen", "--out", out, "--size", size, "--layers", str(layers),
                    "--shards", str(shards), "--experts", str(experts)], check=True,
                   capture_output=True)
    return out


class Deployment:
    """N workers + an N-rank serve job fed by a command file."""

    def __init__(self, tmp_path, nranks, worker_args=None, serve_args=None):
        self.tmp = str(tmp_path)
        self.n = nranks
        self.sock = os.path.join(self.tmp, "sock")
        os.makedirs(self.sock, exist_ok=True)
        self.worker_args = worker_args or (lambda r: [])
        self.serve_args = serve_args or []
        self.workers = {}

    def worker_dump(self, r):
        return os.path.join(self.tmp, "worker-%d" % r)

    def start_worker(self, r, extra=None, updates=None):
        args = [WORKER, "--socket", os.path.join(self.sock, "rank-%d.sock" % r),
                "--dump", self.worker_dump(r), "--timeout-ms", "60000"]
        if updates is not None:
            args += ["--updates", str(updates)]
        args += self.worker_args(r) + (extra or [])
        log = open(os.path.join(self.tmp, "worker-%d.log" % r), "ab")
        self.workers[r] = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        return self.workers[r]

    def worker_log(self, r):
        with open(os.path.join(self.tmp, "worker-%d.log" % r), "rb") as f:
            return f.read().decode(errors="replace")

    def serve(self, commands, timeout=120, check=False):
        cmdfile = os.path.join(self.tmp, "commands-%d" % time.monotonic_ns())
        with open(cmdfile, "w") as f:
            f.write("\n".join(commands + ["quit"]) + "\n")
        args = ["mpirun", "-np", str(self.n), "--bind-to", "none", ENGINE, "serve",
                "--socket-dir", self.sock, "--commands", cmdfile, "--json"] + self.serve_args
        p = subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=MPI_ENV)
        results = []
        for line in p.stdout.splitlines():
            line = line.strip()
            if line.startswith("{"):
                results.append(json.loads(line))
        if check:
            assert p.returncode == 0, p.stdout + p.stderr
        return p, results

    def stop(self):
        for p in self.workers.values():
            if p.poll() is None:
                p.kill()
                p.wait()

    def wait_workers(self, timeout=60):
        for r, p in self.workers.items():
            p.wait(timeout=timeout)


class InteractiveServe:
    """A serve job reading commands from a FIFO, so a test can act between commands."""

    def __init__(self, dep, extra_args=None, nranks=None):
        self.fifo = os.path.join(dep.tmp, "cmd-fifo-%d" % time.monotonic_ns())
        os.mkfifo(self.fifo)
        args = ["mpirun", "-np", str(nranks or dep.n), "--bind-to", "none", ENGINE, "serve",
                "--socket-dir", dep.sock, "--commands", self.fifo, "--json"] + (extra_args or [])
        self.proc = subprocess.Popen(args, env=MPI_ENV, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        self._pending = b""
        self.w = open(self.fifo, "w")

    def send(self, line):
        self.w.write(line + "\n")
        self.w.flush()

    def result(self, timeout=60):
        """The next JSON result line from rank 0. Reads the pipe itself: a buffered
        readline after select() can leave a second line (the JSON after a log line) in
        Python's buffer where select() never sees it."""
        import select
        deadline = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while time.monotonic() < deadline:
            while b"\n" in self._pending:
                line, self._pending = self._pending.split(b"\n", 1)
                if line.startswith(b"{"):
                    return json.loads(line)
            r, _, _ = select.select([fd], [], [], 0.2)
            if r:
                chunk = os.read(fd, 65536)
                if not chunk:
                    raise AssertionError("serve exited: " + self.proc.stderr.read())
                self._pending += chunk
        raise AssertionError("no result within %s s" % timeout)

    def command(self, line, timeout=60):
        self.send(line)
        return self.result(timeout)

    def rank_pids(self):
        out = subprocess.run(["pgrep", "-f", "ckpt-engine serve .*--commands " + self.fifo],
                             capture_output=True, text=True).stdout.split()
        return sorted(int(x) for x in out if int(x) != self.proc.pid)

    def close(self, timeout=30):
        try:
            self.send("quit")
            self.w.close()
        except (BrokenPipeError, OSError):
            pass
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        return self.proc.returncode


def python_worker(tmp_path, text, *args, name="worker.py"):
    """Starts `text` as a Python worker script: sys.argv[1] is python/ (the binding),
    sys.argv[2] tests/python/ (mpijob), then `args`; stdout and stderr piped (text)."""
    here = os.path.dirname(os.path.abspath(__file__))
    src = os.environ.get("CKPT_SOURCE_DIR", os.path.join(here, "..", ".."))
    build = os.environ.get("CKPT_BUILD_DIR", os.path.join(src, "build", "release"))
    script = os.path.join(str(tmp_path), name)
    with open(script, "w") as f:
        f.write(text)
    return subprocess.Popen([sys.executable, script, os.path.join(src, "python"), here,
                             *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=dict(os.environ, CKPT_BUILD_DIR=build))


def wait_log(dep, r, pattern, timeout=20):
    """Polls worker r's log until the regular expression matches; returns the match. Fails
    with the log when it never does (a positive check: a fixed sleep followed by a negative
    check passes when the worker learned nothing)."""
    import re
    deadline = time.monotonic() + timeout
    while True:
        log = dep.worker_log(r)
        m = re.search(pattern, log)
        if m:
            return m
        if time.monotonic() > deadline:
            raise AssertionError("worker %d: no %r within %s s; log:\n%s" % (r, pattern, timeout, log))
        time.sleep(0.1)


def pool_files(pid):
    """The regular files process `pid` (an engine rank) holds open, one (path, link, size)
    per file, opened through /proc/PID/fd: its pools among them. Left out: the IPC buffers
    (ckpt-engine-*) and Open MPI's segment."""
    import stat
    seen, out = set(), []
    for fd in os.listdir("/proc/%d/fd" % pid):
        path = "/proc/%d/fd/%s" % (pid, fd)
        try:
            link, st = os.readlink(path), os.stat(path)
        except OSError:
            continue
        if not stat.S_ISREG(st.st_mode) or st.st_size == 0 or "ckpt-engine-" in link or \
                "open_mpi" in link or (st.st_dev, st.st_ino) in seen:
            continue
        seen.add((st.st_dev, st.st_ino))
        out.append((path, link, st.st_size))
    return out


def corrupt_pool_byte(pids, needle):
    """Flips the first byte of `needle` where it lies in a rank's pool, through the rank's
    own fd of that pool (a stray write, as far as the engine can tell). Exactly one pool
    holds it."""
    hits = []
    for pid in pids:
        for path, link, size in pool_files(pid):
            with open(path, "rb") as f:
                data = f.read()
            at = data.find(needle)
            if at >= 0:
                assert data.find(needle, at + 1) < 0, "needle not unique in %s" % link
                hits.append((pid, path, link, at))
    assert len(hits) == 1, hits
    pid, path, link, at = hits[0]
    fd = os.open(path, os.O_RDWR)
    try:
        b = os.pread(fd, 1, at)
        assert os.pwrite(fd, bytes([b[0] ^ 0x5A]), at) == 1
    finally:
        os.close(fd)
    return pid, link, at


def largest_tensor_needle(model):
    """(name, 64 bytes from the middle of the checkpoint's largest tensor): unique in the
    pools, to find and corrupt it there."""
    name, (_, _, data) = max(read_checkpoint(model).items(), key=lambda kv: len(kv[1][2]))
    return name, data[len(data) // 2:len(data) // 2 + 64]
