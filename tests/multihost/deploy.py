"""Engine deployments on the namespace hosts of hosts.py: one `ckpt-engine serve` MPI job
spread over some hosts (rank r on hosts[r // slots]) fed commands through a FIFO, and one
ckpt-worker per rank started inside the rank's host. Every wait is bounded."""
import json
import os
import re
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
from mpijob import ENGINE, WORKER, read_checkpoint  # noqa: E402

MPI_ENV = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")


def ucx_tcp_env(env=None):
    """UCX over TCP on the namespaces' own link only: shared memory would cross what are
    meant to be separate hosts (they share this machine's /dev/shm)."""
    from hosts import DEV
    return dict(env or MPI_ENV, UCX_TLS="tcp,self", UCX_NET_DEVICES=DEV)


def gen(path, size, shards, layers=4, experts=0):
    subprocess.run([ENGINE, "gen", "--out", str(path), "--size", size, "--shards", str(shards),
                    "--layers", str(layers), "--experts", str(experts)], check=True,
                   capture_output=True, timeout=120)
    return str(path)


def assert_dump_equals(dump_dir, model, who):
    """The worker's dump holds exactly the checkpoint's tensors, byte for byte."""
    got, want = read_checkpoint(str(dump_dir)), read_checkpoint(model)
    assert set(got) == set(want), "%s: tensors %s" % (who, set(got) ^ set(want))
    for name, (dt, shape, data) in want.items():
        assert got[name][0] == dt and got[name][1] == shape, "%s: %s" % (who, name)
        assert got[name][2] == data, "%s: tensor %s differs" % (who, name)


class Deployment:
    """A serve job over `hosts` (indices into a Hosts) with `slots` ranks per host, and
    its workers. Commands go through a FIFO so a test can act between them; results are
    rank 0's JSON lines, read from a file (no pipe to fill up)."""

    def __init__(self, H, hosts, workdir, slots=1, serve_args=(), env=None, tag="dep"):
        self.H, self.hosts, self.slots = H, list(hosts), slots
        self.n = len(self.hosts) * slots
        self.dir = os.path.join(str(workdir), tag)
        self.sock = os.path.join(self.dir, "sock")
        os.makedirs(self.sock, exist_ok=True)
        self.env = env or MPI_ENV
        self.serve_args = list(serve_args)
        self.workers = {}
        self.job = None
        self._w = None
        self._offset = 0
        self._pending = b""

    def host_of_rank(self, r):
        return self.hosts[r // self.slots]

    def dump_dir(self, r):
        return os.path.join(self.dir, "worker-%d" % r)

    def worker_log_path(self, r):
        return os.path.join(self.dir, "worker-%d.log" % r)

    def worker_log(self, r):
        with open(self.worker_log_path(r), "rb") as f:
            return f.read().decode(errors="replace")

    def start_workers(self, args=(), updates=1, timeout_ms=60000, ranks=None):
        """args: the same for every worker, or a function of the rank; ranks: these only
        (default: every rank)."""
        for r in (range(self.n) if ranks is None else ranks):
            argv = [WORKER, "--socket", os.path.join(self.sock, "rank-%d.sock" % r),
                    "--dump", self.dump_dir(r), "--timeout-ms", str(timeout_ms),
                    "--engine-wait-ms", "120000", "--updates", str(updates)]
            argv += list(args(r) if callable(args) else args)
            self.workers[r] = self.H.spawn(self.host_of_rank(r), argv, self.worker_log_path(r),
                                           env=self.env)

    def start(self):
        self.fifo = os.path.join(self.dir, "commands")
        os.mkfifo(self.fifo)
        # O_RDWR: opening a FIFO for writing alone blocks until rank 0 opens it, which is
        # forever when mpirun fails to start.
        self._w = os.open(self.fifo, os.O_RDWR)
        self.out_path = os.path.join(self.dir, "serve.out")
        self.err_path = os.path.join(self.dir, "serve.err")
        argv = self.H.mpirun_argv(self.hosts, [ENGINE, "serve", "--socket-dir", self.sock,
                                               "--commands", self.fifo, "--json"]
                                  + self.serve_args, slots=self.slots)
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            self.job = subprocess.Popen(argv, stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                        env=self.env)
        self.H.procs.append(self.job)
        return self

    def stderr(self):
        with open(self.err_path, "rb") as f:
            return f.read().decode(errors="replace")

    def send(self, line):
        os.write(self._w, (line + "\n").encode())

    def result(self, timeout=60):
        """The next JSON result line of rank 0 within timeout s."""
        deadline = time.monotonic() + timeout
        while True:
            while b"\n" in self._pending:
                line, self._pending = self._pending.split(b"\n", 1)
                if line.startswith(b"{"):
                    return json.loads(line)
            with open(self.out_path, "rb") as f:
                f.seek(self._offset)
                chunk = f.read()
            self._offset += len(chunk)
            self._pending += chunk
            if chunk:
                continue
            if self.job.poll() is not None:
                raise AssertionError("serve exited %s without a result:\n%s"
                                     % (self.job.returncode, self.stderr()[-4000:]))
            if time.monotonic() > deadline:
                raise AssertionError("no result within %s s; serve stderr:\n%s"
                                     % (timeout, self.stderr()[-4000:]))
            time.sleep(0.05)

    def command(self, line, timeout=60):
        self.send(line)
        return self.result(timeout)

    def wait_stderr(self, pattern, timeout):
        """Polls serve's stderr until the regular expression matches; returns the match."""
        deadline = time.monotonic() + timeout
        while True:
            m = re.search(pattern, self.stderr())
            if m:
                return m
            if time.monotonic() > deadline:
                raise AssertionError("no %r in serve's stderr within %s s:\n%s"
                                     % (pattern, timeout, self.stderr()[-4000:]))
            time.sleep(0.1)

    def ranks(self):
        """{MPI rank: (pid, host index)} of this job's engine ranks (`ckpt-engine serve`
        with our FIFO on its command line), found inside the namespaces; the rank is the
        OMPI_COMM_WORLD_RANK Open MPI put in its environment."""
        out = {}
        for h in self.hosts:
            for pid in self.H.pids(h):
                try:
                    with open("/proc/%d/cmdline" % pid, "rb") as f:
                        cmd = f.read().split(b"\0")
                    with open("/proc/%d/environ" % pid, "rb") as f:
                        env = f.read().split(b"\0")
                except OSError:
                    continue
                if (os.path.basename(cmd[0]) == b"ckpt-engine" and b"serve" in cmd
                        and self.fifo.encode() in cmd):
                    for kv in env:
                        if kv.startswith(b"OMPI_COMM_WORLD_RANK="):
                            out[int(kv.split(b"=", 1)[1])] = (pid, h)
        return out

    def assert_placement(self):
        """Every rank runs inside the host the layout says (rank r on hosts[r // slots])."""
        ranks = self.ranks()
        want = {r: self.host_of_rank(r) for r in range(self.n)}
        got = {r: h for r, (_, h) in ranks.items()}
        assert got == want, "ranks on hosts %s, expected %s" % (got, want)

    def close(self, timeout=30):
        """quit, then a bounded wait for mpirun; returns its exit status (None: it had to
        be killed)."""
        if self.job is None:
            return None
        if self._w is not None:
            try:
                self.send("quit")
            except OSError:
                pass
            os.close(self._w)
            self._w = None
        try:
            return self.job.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.job.kill()
            self.job.wait(timeout=10)
            return None

    def wait_workers(self, timeout=60):
        """Every worker exited within timeout s; returns {rank: exit status}."""
        deadline = time.monotonic() + timeout
        out = {}
        for r, p in self.workers.items():
            try:
                out[r] = p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                raise AssertionError("worker %d still running after %s s; log:\n%s"
                                     % (r, timeout, self.worker_log(r)))
        return out

    def stop_workers(self, timeout=10):
        """SIGTERM the workers still running and reap them (bounded; SIGKILL after)."""
        for p in self.workers.values():
            if p.poll() is None:
                p.terminate()
        for p in self.workers.values():
            try:
                p.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=10)

    def wait_worker_log(self, r, pattern, timeout=30):
        deadline = time.monotonic() + timeout
        while True:
            m = re.search(pattern, self.worker_log(r))
            if m:
                return m
            if time.monotonic() > deadline:
                raise AssertionError("worker %d: no %r within %s s; log:\n%s"
                                     % (r, pattern, timeout, self.worker_log(r)))
            time.sleep(0.1)
