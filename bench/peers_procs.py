"""Process plumbing of bench/peers.py: the engine ranks (an mpirun job reading commands
from a FIFO), reference workers (ckpt-worker), the trainer and reader roles
(peers_roles.py), each with its own logs under the work folder."""
import json
import os
import select
import signal
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROLES = os.path.join(HERE, "peers_roles.py")

MPI_ENV = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               OMPI_MCA_rmaps_base_oversubscribe="1")


class Failed(Exception):
    """A row failed; the text says why (and where the logs are)."""


class LineProc:
    """A process answering JSON lines on stdout, stderr to a log file."""

    def __init__(self, args, log, env=None):
        self.log = log
        self.proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=open(log, "ab"), env=env)
        self._buf = b""

    def send(self, obj):
        self.proc.stdin.write((json.dumps(obj) + "\n").encode())
        self.proc.stdin.flush()

    def recv(self, timeout=600):
        deadline = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while True:
            if b"\n" in self._buf:
                line, self._buf = self._buf.split(b"\n", 1)
                if line.startswith(b"{"):
                    return json.loads(line)
                continue
            left = deadline - time.monotonic()
            if left <= 0:
                raise Failed("no answer within %d s (log: %s)" % (timeout, self.log))
            r, _, _ = select.select([fd], [], [], min(left, 1.0))
            if r:
                chunk = os.read(fd, 1 << 20)
                if not chunk:
                    raise Failed("process exited (status %s); log %s: %s" %
                                 (self.proc.wait(), self.log, tail(self.log)))
                self._buf += chunk

    def close(self):
        if self.proc.poll() is None:
            try:
                self.send({"op": "quit"})
                self.proc.stdin.close()
                self.proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()


def tail(path, n=1500):
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - n))
            return f.read().decode(errors="replace").strip()
    except OSError:
        return ""


def role(kind, ckpt, log):
    return LineProc([sys.executable, ROLES, kind, ckpt], log)


class Serve:
    """`mpirun -np N ckpt-engine serve` reading commands from a FIFO (rank 0's input)."""

    def __init__(self, engine, nranks, sock, work, extra=None, env=None):
        os.makedirs(sock, exist_ok=True)
        self.fifo = os.path.join(work, "commands-%d" % time.monotonic_ns())
        os.mkfifo(self.fifo)
        self.log = os.path.join(work, "serve-%d.log" % time.monotonic_ns())
        args = ["mpirun", "-np", str(nranks), "--bind-to", "none", engine, "serve",
                "--socket-dir", sock, "--commands", self.fifo, "--json",
                "--timeout-ms", "120000"] + (extra or [])
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE,
                                     stderr=open(self.log, "ab"), env=env or MPI_ENV)
        self._buf = b""
        # Read-write: opening a FIFO write-only blocks until the engine opens it, forever
        # when the engine died first; its death shows as EOF on its stdout instead.
        self.w = os.fdopen(os.open(self.fifo, os.O_RDWR), "w")

    def send(self, line):
        self.w.write(line + "\n")
        self.w.flush()

    def result(self, timeout=600):
        deadline = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while True:
            while b"\n" in self._buf:
                line, self._buf = self._buf.split(b"\n", 1)
                if line.startswith(b"{"):
                    return json.loads(line)
            left = deadline - time.monotonic()
            if left <= 0:
                raise Failed("engine: no result within %d s (log: %s)" % (timeout, self.log))
            r, _, _ = select.select([fd], [], [], min(left, 1.0))
            if r:
                chunk = os.read(fd, 65536)
                if not chunk:
                    raise Failed("engine exited (status %s): %s" % (self.proc.wait(),
                                                                    tail(self.log)))
                self._buf += chunk

    def command(self, line, timeout=600):
        self.send(line)
        return self.result(timeout)

    def close(self):
        try:
            self.send("quit")
            self.w.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class Workers:
    """N ckpt-worker processes, each writing the checksums of what it holds after every
    completed update (--checksum-out): how the bench verifies them."""

    def __init__(self, worker, n, sock, work, tag):
        self.files, self.procs, self.logs = [], [], []
        for r in range(n):
            ck = os.path.join(work, "%s-checksums-%d.json" % (tag, r))
            log = os.path.join(work, "%s-worker-%d.log" % (tag, r))
            self.files.append(ck)
            self.logs.append(log)
            self.procs.append(subprocess.Popen(
                [worker, "--socket", os.path.join(sock, "rank-%d.sock" % r),
                 "--checksum-out", ck, "--post-hook-sleep-ms", "0", "--timeout-ms", "120000"],
                stdout=open(log, "ab"), stderr=subprocess.STDOUT))

    def checksums(self, update_id, timeout=300):
        """Every worker's {name: hex} once it wrote those of update `update_id`."""
        out = []
        deadline = time.monotonic() + timeout
        for r, path in enumerate(self.files):
            while True:
                try:
                    with open(path) as f:
                        doc = json.load(f)
                    if doc["update_id"] == update_id:
                        out.append(doc["tensors"])
                        break
                except (OSError, ValueError, KeyError):
                    pass
                if self.procs[r].poll() is not None:
                    raise Failed("worker %d exited: %s" % (r, tail(self.logs[r])))
                if time.monotonic() > deadline:
                    raise Failed("worker %d wrote no checksums of update %d within %d s: %s"
                                 % (r, update_id, timeout, tail(self.logs[r])))
                time.sleep(0.02)
        return out

    def stop(self):
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def wait_paths(paths, serve=None, timeout=60, what="engine sockets"):
    deadline = time.monotonic() + timeout
    while not all(os.path.exists(p) for p in paths):
        if serve is not None and serve.proc.poll() is not None:
            raise Failed("engine exited (status %s) before its sockets appeared: %s"
                         % (serve.proc.returncode, tail(serve.log)))
        if time.monotonic() > deadline:
            raise Failed("%s did not appear within %d s: %s" % (what, timeout, ", ".join(paths)))
        time.sleep(0.05)
