"""ckpt-engine beside what users do today, on the same bytes, the same workers and the same
machine, in one run (`make bench`, scripts/bench; docs/BENCH.md).

Each row is the time from "the trainer has new weights in memory" to "every worker holds
them in its own tensors", and every row verifies every worker's bytes (XXH3-64 of each
tensor against the trainer's) after the clock stopped; a row that fails is shown as
failed, a row that does not fit in memory as not run with the memory it needs.

  ckpt-engine   publish from the trainer's memory (registration), then a broadcast update,
                direct and staged; the P2P update of a joining deployment
  save+reload   the trainer writes safetensors (disk with fsync; /dev/shm), every worker
                parses it and reads each tensor straight into its own buffer
  torch         one torch.distributed.broadcast per tensor, gloo on CPU
  MPI           one MPI_Bcast per tensor; tensors packed into 256 MiB buckets
  floors        memcpy (one core), MPI_Bcast of flat buffers, a raw read of the file

Figures are medians of --repeat runs (a first, untimed warm-up for the rows whose first run
maps or connects); the floors run between the blocks of rows, and their median is shown.
Writes DIR/peers.json (every figure), DIR/peers.png (time against size, and time per GiB)
and DIR/peers-planning.png (metas gather and planning for 10k and 100k tensors).
"""
import argparse
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.dirname(HERE)
sys.path[:0] = [HERE, os.path.join(SRC, "python")]

import numpy as np  # noqa: E402

import peers_lib as pl  # noqa: E402
from peers_procs import MPI_ENV, Failed, Serve, Workers, role, tail, wait_paths  # noqa: E402

GIB = 1 << 30
BUCKET = 256 << 20

# Row ids, in table order, with what they mean.
METHODS = [
    ("engine.publish", "ckpt-engine: publish (registration from memory)"),
    ("engine.direct", "ckpt-engine: update, direct"),
    ("engine.staged", "ckpt-engine: update, staged"),
    ("engine.publish+direct", "ckpt-engine: publish + direct update"),
    ("engine.publish+staged", "ckpt-engine: publish + staged update"),
    ("engine.p2p", "ckpt-engine: P2P update of a joining deployment"),
    ("save.disk", "save + reload: disk (fsync)"),
    ("save.shm", "save + reload: /dev/shm"),
    ("torch", "torch.distributed broadcast per tensor (gloo)"),
    ("mpi.pertensor", "MPI_Bcast per tensor"),
    ("mpi.bucketed", "MPI_Bcast, 256 MiB buckets"),
    ("floor.memcpy", "floor: memcpy, one core"),
    ("floor.bcast", "floor: MPI_Bcast, flat buffers"),
    ("floor.read", "floor: raw read of the file (page cache)"),
]
LABEL = dict(METHODS)
# What a user compares: the end-to-end rows (stages and floors are context).
HEADLINE = ["engine.publish+direct", "engine.publish+staged", "engine.p2p", "save.disk",
            "save.shm", "torch", "mpi.pertensor", "mpi.bucketed"]
TORCH_HINT = ("pip install torch (a CPU build is enough), or set CKPT_BENCH_TORCH_PYTHON to "
              "a python that has it (scripts/install-vllm makes one)")


def progress(msg):
    print("bench: " + msg, file=sys.stderr, flush=True)


def median(xs):
    return statistics.median(xs) if xs else None


def mem_available():
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


class Case:
    """One checkpoint with N workers: its rows, filled block by block."""

    def __init__(self, label, ckpt, nbytes, ntensors, workers):
        self.label, self.ckpt, self.nbytes, self.ntensors = label, ckpt, nbytes, ntensors
        self.n = workers
        # File and command names: no spaces (engine commands split on them).
        self.slug = "".join(ch if ch.isalnum() or ch in ".-" else "_" for ch in label) + "-%dw" % workers
        self.rows = {}

    def row(self, mid):
        return self.rows.setdefault(mid, {"method": mid, "label": LABEL[mid], "status": "ok",
                                          "samples": [], "verified": None, "reason": "",
                                          "stages": {}, "detail": []})

    def fail(self, mid, why):
        r = self.row(mid)
        r["status"], r["reason"], r["verified"] = "failed", str(why), False

    def not_run(self, mid, why):
        r = self.row(mid)
        r["status"], r["reason"] = "not run", why

    def fits(self, mids, need):
        """Marks the rows not run when `need` bytes are not available now."""
        avail = mem_available()
        if need + (1 << 30) <= avail:
            return True
        for m in mids:
            self.not_run(m, "not run, needs %.1f GiB (%.1f GiB available)" % (need / GIB, avail / GIB))
        return False

    def verify(self, mid, got_list, want):
        for w, got in enumerate(got_list):
            bad = [k for k, v in want.items() if got.get(k) != v]
            if bad or len(got) != len(want):
                raise Failed("worker %d: %d of %d tensors differ from the trainer's (first: %s)"
                             % (w, len(bad), len(want), bad[:1]))
        r = self.row(mid)
        if r["verified"] is None:
            r["verified"] = True


class Bench:
    def __init__(self, args):
        self.a = args
        self.build = os.path.abspath(args.build)
        self.engine = os.path.join(self.build, "tools", "ckpt-engine")
        self.worker = os.path.join(self.build, "tools", "ckpt-worker")
        self.mpi_peers = os.path.join(self.build, "bench", "mpi_peers")
        for p in (self.engine, self.worker, self.mpi_peers):
            if not os.path.exists(p):
                sys.exit("bench: %s not found: build first (make build)" % p)
        os.environ["CKPT_BUILD_DIR"] = self.build
        self.work = tempfile.mkdtemp(prefix="ckpt-bench-", dir=args.work)
        self.shm = tempfile.mkdtemp(prefix="ckpt-bench-", dir="/dev/shm")
        # Engine sockets live in a short path: a Unix socket's path is at most 107 bytes.
        self.sock = tempfile.mkdtemp(prefix="ckpt-bench-")
        self.torch_py, self.torch_why = self.find_torch()
        self.cases = []
        self.floor_runs = 0

    # ---- the checkpoint ----------------------------------------------------------------
    def checkpoint(self, size):
        out = os.path.join(self.work, "ckpt-%s" % size)
        subprocess.run([self.engine, "gen", "--out", out, "--size", size, "--shards", "1"],
                       check=True, capture_output=True)
        return out

    # ---- floors, run between the blocks of every case --------------------------------
    def floors(self, c):
        m = min(c.nbytes, GIB)
        src, dst = pl.touched(m), pl.touched(m)
        src.fill(1)
        best = []
        for _ in range(2):
            t0 = time.monotonic()
            np.copyto(dst, src)
            best.append(time.monotonic() - t0)
        del src, dst
        c.row("floor.memcpy")["samples"].append(min(best) * c.nbytes / m)
        files = pl.files_of(c.ckpt)
        buf = pl.touched(64 << 20)
        mv = memoryview(buf)
        t = []
        for _ in range(2):  # the second pass: from the page cache, as a reload right after a save
            t0 = time.monotonic()
            for fn in files:
                fd = os.open(fn, os.O_RDONLY)
                while os.readv(fd, [mv]) > 0:
                    pass
                os.close(fd)
            t.append(time.monotonic() - t0)
        c.row("floor.read")["samples"].append(t[-1])

    # ---- ckpt-engine ---------------------------------------------------------------------
    def engine_block(self, c, trainer, state):
        mids = ["engine.publish", "engine.direct", "engine.staged", "engine.publish+direct",
                "engine.publish+staged"]
        # trainer + the registered and the incoming version + every worker's copy
        if not c.fits(mids + ["engine.p2p"], c.nbytes * (3 + c.n) + (600 << 20)):
            return
        sock = os.path.join(self.sock, "eng-" + c.slug)
        serve = workers = jserve = jworkers = None
        phase = mids
        try:
            serve = Serve(self.engine, c.n, sock, self.work)
            wait_paths([os.path.join(sock, "%s-%d.sock" % (k, r)) for r in range(c.n)
                        for k in ("rank", "publish")], serve)
            workers = Workers(self.worker, c.n, sock, self.work, "eng-" + c.slug)
            for rep in range(self.a.repeat + 1):  # run 0: the workers' first touch, untimed
                reg, sums = self.publish(serve, trainer, sock, state)
                st1 = self.last_publish_stages
                d, res_d = self.update(serve, "update bench", workers, sums, c, "engine.direct")
                reg2, sums = self.publish(serve, trainer, sock, state)
                st2 = self.last_publish_stages
                s, res_s = self.update(serve, "update bench direct=0", workers, sums, c,
                                       "engine.staged")
                if rep == 0:
                    continue
                for mid, v in (("engine.publish", reg), ("engine.publish", reg2),
                               ("engine.direct", d), ("engine.staged", s),
                               ("engine.publish+direct", reg + d),
                               ("engine.publish+staged", reg2 + s)):
                    c.row(mid)["samples"].append(v)
                c.row("engine.publish+direct")["stages"].setdefault("registration", []).append(reg)
                c.row("engine.publish+direct")["stages"].setdefault("update", []).append(d)
                c.row("engine.publish+staged")["stages"].setdefault("registration", []).append(reg2)
                c.row("engine.publish+staged")["stages"].setdefault("update", []).append(s)
                for st in (st1, st2):
                    for k, v in st.items():
                        c.row("engine.publish")["stages"].setdefault(k, []).append(v)
                c.row("engine.direct")["detail"].append(engine_stages(res_d))
                c.row("engine.staged")["detail"].append(engine_stages(res_s))
            for mid in ("engine.publish", "engine.publish+direct", "engine.publish+staged"):
                c.row(mid)["verified"] = c.row("engine.direct" if "staged" not in mid
                                                else "engine.staged")["verified"]
            ps = {k: median(v) for k, v in c.row("engine.publish")["stages"].items()}
            progress("%s x %d: ckpt-engine publish (%s) %.2f s (memfd %.2f, copy %.2f, send + "
                     "register %.2f), direct %.2f s, staged %.2f s" % (
                c.label, c.n, self.a.publish, median(c.row("engine.publish")["samples"]),
                ps.get("memfd", 0), ps.get("copy", 0), ps.get("send+register", 0),
                median(c.row("engine.direct")["samples"]),
                median(c.row("engine.staged")["samples"])))
            # The joining deployment: its own ranks and workers; the serving workers go,
            # so that both sets of workers never hold the checkpoint at once.
            phase = ["engine.p2p"]
            workers.stop()
            fl = serve.command("floors")
            if fl.get("ok"):
                c.engine_floors = {k: fl[k] for k in fl if k.endswith("gbps")}
            jsock = os.path.join(self.sock, "p2p-" + c.slug)
            jserve = Serve(self.engine, c.n, jsock, self.work)
            wait_paths([os.path.join(jsock, "rank-%d.sock" % r) for r in range(c.n)], jserve)
            jworkers = Workers(self.worker, c.n, jsock, self.work, "p2p-" + c.slug)
            metas = os.path.join(self.work, "metas-%s.json" % c.slug)
            for rep in range(self.a.repeat + 1):
                _, sums = self.publish(serve, trainer, sock, state)
                ex = serve.command("export bench %s" % metas)
                if not ex.get("ok"):
                    raise Failed("export: %s" % ex.get("reason"))
                p, res = self.update(jserve, "p2p-update %s" % metas, jworkers, sums, c,
                                     "engine.p2p")
                if rep:
                    c.row("engine.p2p")["samples"].append(p)
                    c.row("engine.p2p")["detail"].append(engine_stages(res))
            progress("%s x %d: ckpt-engine P2P update %.2f s" % (
                c.label, c.n, median(c.row("engine.p2p")["samples"])))
        except Failed as e:
            # What failed and what never ran after it: failed, naming the cause.
            for mid in phase + ["engine.p2p"]:
                c.fail(mid, e)
            progress("%s x %d: ckpt-engine FAILED: %s" % (c.label, c.n, e))
        finally:
            for w in (workers, jworkers):
                if w:
                    w.stop()
            for s in (jserve, serve):
                if s:
                    s.close()

    def publish(self, serve, trainer, sock, state):
        """A training step (every byte changes, untimed), then publish() until registered."""
        sums = self.mutate(trainer, state)
        serve.send("await-published bench timeout=600000")
        trainer.send({"op": "publish", "name": "bench", "dir": sock, "step": state["step"],
                      "pull": self.a.publish == "pull"})
        tr = trainer.recv()
        res = serve.result()
        if "error" in tr or not tr.get("registered") or not res.get("ok"):
            raise Failed("publish: %s / engine: %s" % (tr.get("error") or tr.get("text"),
                                                       res.get("reason")))
        self.last_publish_stages = tr.get("stages") or {}
        return tr["t1"] - tr["t0"], sums

    def mutate(self, trainer, state):
        state["step"] += 1
        trainer.send({"op": "mutate", "byte": state["step"] % 255 + 1})
        state["sums"] = trainer.recv()["checksums"]
        return state["sums"]

    def update(self, serve, cmd, workers, sums, c, mid):
        t0 = time.monotonic()
        res = serve.command(cmd)
        t = time.monotonic() - t0
        if not res.get("ok"):
            raise Failed("%s: %s" % (cmd.split()[0], res.get("reason")))
        c.verify(mid, workers.checksums(res["update_id"]), sums)
        return t, res

    # ---- save and reload -------------------------------------------------------------
    def save_block(self, c, trainer, state):
        for mid, where, fsync in (("save.disk", self.work, True), ("save.shm", self.shm, False)):
            # trainer + the file (page cache or tmpfs) + every worker's copy
            if not c.fits([mid], c.nbytes * (2 + c.n)):
                continue
            readers = []
            try:
                readers = [role("reader", c.ckpt, os.path.join(self.work, "reader-%d.log" % r))
                           for r in range(c.n)]
                for r in readers:
                    r.recv()
                path = os.path.join(where, "bench.safetensors")
                stage_save, stage_load = [], []
                for rep in range(self.a.repeat):
                    sums = self.mutate(trainer, state)
                    trainer.send({"op": "save", "path": path, "fsync": fsync})
                    sv = trainer.recv()
                    if "error" in sv:
                        raise Failed("save: " + sv["error"])
                    for r in readers:
                        r.send({"op": "load", "path": path})
                    ends = [r.recv() for r in readers]
                    bad = [e["error"] for e in ends if "error" in e]
                    if bad:
                        raise Failed("reload: " + bad[0])
                    end = max(e["t1"] for e in ends)
                    c.verify(mid, [r.recv()["checksums"] for r in readers], sums)
                    os.unlink(path)
                    c.row(mid)["samples"].append(end - sv["t0"])
                    stage_save.append(sv["t1"] - sv["t0"])
                    stage_load.append(end - sv["t1"])
                c.row(mid)["stages"] = {"save": stage_save, "reload": stage_load}
                progress("%s x %d: %s %.2f s (save %.2f, reload %.2f)" % (
                    c.label, c.n, LABEL[mid], median(c.row(mid)["samples"]),
                    median(stage_save), median(stage_load)))
            except Failed as e:
                c.fail(mid, e)
                progress("%s x %d: %s FAILED: %s" % (c.label, c.n, LABEL[mid], e))
            finally:
                for r in readers:
                    r.close()

    # ---- torch.distributed -----------------------------------------------------------
    def find_torch(self):
        cands = [os.environ.get("CKPT_BENCH_TORCH_PYTHON"), sys.executable,
                 os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"),
                              "ckpt-engine", "vllm-0.32-venv", "bin", "python")]
        for py in cands:
            if not py or not os.path.exists(py):
                continue
            p = subprocess.run([py, "-c", "import torch, torch.distributed as d, numpy; "
                                "assert d.is_gloo_available(); print(torch.__version__)"],
                               capture_output=True, text=True)
            if p.returncode == 0:
                return py, None
        return None, "not run: torch not installed (%s)" % TORCH_HINT

    def torch_block(self, c):
        if not self.torch_py:
            c.not_run("torch", self.torch_why)
            return
        if not c.fits(["torch"], c.nbytes * (1 + c.n) + (c.n + 1) * (400 << 20)):
            return
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   WORLD_SIZE=str(c.n + 1), GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1",
                   CKPT_BUILD_DIR=self.build)
        log = os.path.join(self.work, "torch-%s.log" % c.slug)
        procs = []
        for r in range(c.n + 1):
            procs.append(subprocess.Popen(
                [self.torch_py, os.path.join(HERE, "peers_torch.py"), c.ckpt,
                 str(self.a.repeat + 1)], env=dict(env, RANK=str(r)),
                stdout=subprocess.PIPE if r == 0 else subprocess.DEVNULL,
                stderr=open(log, "ab"), text=True))
        try:
            out, _ = procs[0].communicate(timeout=1800)
            for p in procs[1:]:
                p.wait(timeout=120)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
                p.wait()
            c.fail("torch", "no result within 30 min (log %s)" % log)
            return
        self.job_rows(c, "torch", out, procs[0].returncode, log)

    # ---- hand-written MPI ------------------------------------------------------------
    def mpi_block(self, c):
        # Every rank (trainer and workers) holds the tensors; the floor also a flat copy
        # of them on every rank (it was OOM-killed at 4 GiB x 2 with one flat copy counted).
        for mode, mid, extra in (("floor", "floor.bcast", c.nbytes * (1 + c.n)),
                                 ("pertensor", "mpi.pertensor", 0),
                                 ("bucketed", "mpi.bucketed", BUCKET * (c.n + 1))):
            if not c.fits([mid], c.nbytes * (1 + c.n) + extra):
                continue
            log = os.path.join(self.work, "mpi-%s-%s.log" % (mode, c.slug))
            p = subprocess.run(["mpirun", "-np", str(c.n + 1), "--bind-to", "none",
                                self.mpi_peers, "--mode", mode, c.ckpt, "--bucket", str(BUCKET),
                                "--repeat", str(self.a.repeat + 1)],
                               capture_output=True, text=True, env=MPI_ENV, timeout=1800)
            with open(log, "w") as f:
                f.write(p.stderr)
            self.job_rows(c, mid, p.stdout, p.returncode, log)

    def job_rows(self, c, mid, out, rc, log):
        """Rows of a job printing one JSON line per repeat (the first is the warm-up)."""
        lines = [json.loads(l) for l in out.splitlines() if l.startswith("{")]
        if not lines or rc != 0 or not all(l["verified"] for l in lines):
            bad = sum(l.get("mismatches", 0) for l in lines)
            c.fail(mid, "exit status %s, %d of %d runs reported, %d tensor mismatches; log %s: %s"
                   % (rc, len(lines), self.a.repeat + 1, bad, log, tail(log, 600)))
            progress("%s x %d: %s FAILED" % (c.label, c.n, LABEL[mid]))
            return
        r = c.row(mid)
        r["samples"] += [l["seconds"] for l in lines[1:]]
        r["verified"] = True
        if "torch" in lines[0]:
            r["detail"].append({"torch": lines[0]["torch"]})
        progress("%s x %d: %s %.2f s" % (c.label, c.n, LABEL[mid], median(r["samples"])))

    # ---- one case ---------------------------------------------------------------------
    def run_case(self, c):
        progress("== %s (%d tensors) with %d workers" % (c.label, c.ntensors, c.n))
        state = {"step": 0, "sums": None}
        self.floors(c)
        trainer = None
        try:
            if c.fits(["engine.publish"], c.nbytes):
                trainer = role("trainer", c.ckpt, os.path.join(self.work, "trainer.log"))
                ready = trainer.recv()
                if ready.get("bytes") != c.nbytes:
                    raise Failed("trainer loaded %s bytes, not %d" % (ready.get("bytes"), c.nbytes))
                self.engine_block(c, trainer, state)
                self.floors(c)
                self.save_block(c, trainer, state)
            else:  # no room for the trainer's own copy: no row that needs it runs
                for m in ["engine.direct", "engine.staged", "engine.publish+direct",
                          "engine.publish+staged", "engine.p2p", "save.disk", "save.shm"]:
                    c.not_run(m, c.row("engine.publish")["reason"])
        except Failed as e:
            for mid in ["engine.publish", "save.disk", "save.shm"]:
                c.fail(mid, e)
        finally:
            if trainer:
                trainer.close()
        self.floors(c)
        self.torch_block(c)
        self.mpi_block(c)
        self.floors(c)
        for r in c.rows.values():
            if r["method"].startswith("floor.") and r["status"] == "ok":
                r["verified"] = r["verified"] if r["method"] == "floor.bcast" else True

    # ---- planning: metas gather and planning for many tensors ------------------------
    def planning(self, counts):
        out = {}
        for n in counts:
            path = os.path.join(self.work, "plan-%d.safetensors" % n)
            write_many(path, n)
            sock = os.path.join(self.sock, "plan-%d" % n)
            serve = workers = None
            try:
                serve = Serve(self.engine, 2, sock, self.work)
                wait_paths([os.path.join(sock, "rank-%d.sock" % r) for r in range(2)], serve)
                workers = Workers(self.worker, 2, sock, self.work, "plan-%d" % n)
                reg = serve.command("register plan %s" % path)
                if not reg.get("ok"):
                    raise Failed("register: %s" % reg.get("reason"))
                rows = {"tensors": n, "register_s": reg.get("seconds")}
                want = pl.reference_checksums(path)
                for mode, cmd in (("direct", "update plan"), ("staged", "update plan direct=0")):
                    runs = []
                    for _ in range(2):  # the second: the workers' model exists
                        res = serve.command(cmd)
                        if not res.get("ok"):
                            raise Failed("%s: %s" % (cmd, res.get("reason")))
                        got = workers.checksums(res["update_id"])
                        if any(g != want for g in got):
                            raise Failed("%d tensors: a worker's bytes differ" % n)
                        runs.append(res)
                    r = runs[-1]
                    rows[mode] = {"gather_s": r["gather_s"], "plan_s": r["plan_s"],
                                  "begin_s": r["begin_s"], "pipeline_s": r["pipeline_s"],
                                  "finish_s": r["finish_s"], "total_s": r["total_s"]}
                rows["ok"], rows["verified"] = True, True
                progress("planning, %d tensors: gather + plan %.3f s direct, %.3f s staged" % (
                    n, rows["direct"]["gather_s"] + rows["direct"]["plan_s"],
                    rows["staged"]["gather_s"] + rows["staged"]["plan_s"]))
            except Failed as e:
                rows = {"tensors": n, "ok": False, "verified": False, "reason": str(e)}
                progress("planning, %d tensors: FAILED: %s" % (n, e))
            finally:
                if workers:
                    workers.stop()
                if serve:
                    serve.close()
                os.unlink(path)
            out[str(n)] = rows
        return out

    def cleanup(self):
        if self.a.keep:
            progress("kept %s" % self.work)
        else:
            shutil.rmtree(self.work, ignore_errors=True)
        shutil.rmtree(self.shm, ignore_errors=True)
        shutil.rmtree(self.sock, ignore_errors=True)


def engine_stages(res):
    return {k: res.get(k) for k in ("gather_s", "plan_s", "begin_s", "pipeline_s", "finish_s",
                                     "total_s", "pull_s", "buckets", "direct", "p2p")}


def write_many(path, n):
    """A safetensors file of n small float32 tensors (64 elements): the tensor count of a
    large MoE model with little data, so metas and planning dominate."""
    header, off = {}, 0
    for i in range(n):
        header["model.layers.%d.experts.%d.w" % (i // 256, i % 256)] = {
            "dtype": "F32", "shape": [64], "data_offsets": [off, off + 256]}
        off += 256
    hj = json.dumps(header, separators=(",", ":")).encode()
    hj += b" " * (-len(hj) % 8)
    data = np.random.default_rng(n).integers(0, 255, off, dtype=np.uint8)
    with open(path, "wb") as f:
        f.write(len(hj).to_bytes(8, "little") + hj)
        f.write(data.tobytes())


# ---- results ------------------------------------------------------------------------
def summarize(cases):
    rows = []
    for c in cases:
        eng = c.rows.get("engine.publish+direct")
        base = median(eng["samples"]) if eng and eng["status"] == "ok" else None
        for mid, _ in METHODS:
            r = c.rows.get(mid)
            if r is None:
                continue
            med = median(r["samples"]) if r["status"] == "ok" else None
            row = {"checkpoint": c.label, "bytes": c.nbytes, "tensors": c.ntensors,
                   "workers": c.n, "method": mid, "label": r["label"], "status": r["status"],
                   "reason": r["reason"], "verified": r["verified"], "samples_s": r["samples"],
                   "median_s": med,
                   "gib_per_s": c.nbytes / GIB / med if med else None,
                   "s_per_gib": med / (c.nbytes / GIB) if med else None,
                   "vs_engine": med / base if med and base else None,
                   "stages_median_s": {k: median(v) for k, v in r["stages"].items()},
                   "engine_stages": r["detail"]}
            if mid == "engine.publish+direct" and getattr(c, "engine_floors", None):
                row["engine_floors_gbps"] = c.engine_floors
            rows.append(row)
    return rows


def flatness(rows):
    """Per method and worker count: s/GiB at each size, and whether it stays flat (the
    largest size costs at most 1.3x per GiB what the smallest does)."""
    out = {}
    for r in rows:
        if r["s_per_gib"] is None or r["checkpoint"].startswith("dir:"):
            continue
        out.setdefault("%s@%d" % (r["method"], r["workers"]), []).append((r["bytes"], r["s_per_gib"]))
    res = {}
    for k, pts in out.items():
        pts.sort()
        mid, n = k.rsplit("@", 1)
        entry = {"method": mid, "workers": int(n),
                 "s_per_gib": {"%.2f GiB" % (b / GIB): v for b, v in pts}}
        if len(pts) >= 2:
            entry["growth"] = pts[-1][1] / pts[0][1]
            entry["flat"] = entry["growth"] <= 1.3
        res[k] = entry
    return res


def acceptance(rows):
    """The issue's ratios at 1 GiB with 2 workers, from this run."""
    at = {r["method"]: r for r in rows if r["workers"] == 2 and abs(r["bytes"] - GIB) < 0.05 * GIB}
    eng = at.get("engine.publish+direct")
    if not eng or eng["median_s"] is None:
        return {"note": "no 1 GiB x 2 workers ckpt-engine figure in this run"}
    out = {}
    for mid, want in (("save.disk", 5.0), ("save.shm", 2.0), ("torch", 3.0)):
        r = at.get(mid)
        if not r or r["median_s"] is None:
            out[mid] = {"want": want, "status": r["status"] if r else "not run"}
            continue
        x = r["median_s"] / eng["median_s"]
        out[mid] = {"want": want, "speedup": x, "met": x >= want}
    out["engine_stages_s"] = eng["stages_median_s"]
    pub = at.get("engine.publish")
    out["publish_stages_s"] = pub["stages_median_s"] if pub else {}
    return out


def table(rows, planning):
    lines = []
    key = None
    for r in rows:
        k = (r["checkpoint"], r["workers"])
        if k != key:
            key = k
            lines.append("")
            lines.append("%s (%d tensors), %d worker%s" % (r["checkpoint"], r["tensors"],
                         r["workers"], "" if r["workers"] == 1 else "s"))
            lines.append("  %-52s %9s %8s %8s %9s  %s" % ("method", "median s", "GiB/s", "s/GiB",
                                                         "x engine", "verified"))
        if r["status"] != "ok":
            lines.append("  %-52s %s" % (r["label"], r["status"].upper() + ": " + r["reason"]
                                         if r["status"] == "failed" else r["reason"]))
            continue
        lines.append("  %-52s %9.3f %8.2f %8.3f %9s  %s" % (
            r["label"], r["median_s"], r["gib_per_s"], r["s_per_gib"],
            "%.2fx" % r["vs_engine"] if r["vs_engine"] else "-",
            {True: "yes", False: "NO", None: "-"}[r["verified"]]))
    if planning:
        lines.append("")
        lines.append("metas gather + planning (2 ranks, engine's own timers)")
        for n, p in planning.items():
            if not p.get("ok"):
                lines.append("  %7s tensors: FAILED: %s" % (n, p.get("reason")))
                continue
            lines.append("  %7s tensors: direct %.3f + %.3f s, staged %.3f + %.3f s "
                         "(gather + plan); update total %.2f / %.2f s" % (
                             n, p["direct"]["gather_s"], p["direct"]["plan_s"],
                             p["staged"]["gather_s"], p["staged"]["plan_s"],
                             p["direct"]["total_s"], p["staged"]["total_s"]))
    return "\n".join(lines)


def plot(rows, planning, out_png, out_plan):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "plots not written: matplotlib not installed (pip install matplotlib)"
    ns = sorted({r["workers"] for r in rows})
    # The worker count present at most sizes is the one the lines are drawn for.
    n = max(ns, key=lambda k: len({r["bytes"] for r in rows if r["workers"] == k}))
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 6.4))
    for mid, label in METHODS:
        if mid in ("engine.direct", "engine.staged"):
            continue
        pts = sorted((r["bytes"] / GIB, r["median_s"], r["s_per_gib"]) for r in rows
                     if r["method"] == mid and r["workers"] == n and r["median_s"])
        if not pts:
            continue
        style = "--x" if mid.startswith("floor.") else ("-o" if mid.startswith("engine.") else "-s")
        ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=label, linewidth=1.5)
        ax2.plot([p[0] for p in pts], [p[2] for p in pts], style, label=label, linewidth=1.5)
    for a, t, yl in ((ax, "update time (trainer memory -> every worker, verified)", "seconds"),
                     (ax2, "time per GiB (flat = no super-linear cost)", "seconds per GiB")):
        a.set_xscale("log", base=2)
        a.set_yscale("log")
        a.set_xlabel("checkpoint size (GiB)")
        a.set_ylabel(yl)
        a.set_title(t, fontsize=10)
        a.grid(True, which="both", alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.suptitle("ckpt-engine and its peers, %d worker%s, one run on %s (%d cores)" % (
        n, "" if n == 1 else "s", platform.node(), os.cpu_count()), fontsize=11)
    fig.tight_layout(rect=(0, 0.17, 1, 1))
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    ok = {k: v for k, v in planning.items() if v.get("ok")}
    if ok:
        fig, ax = plt.subplots(figsize=(7, 4.2))
        labels = list(ok)
        x = np.arange(len(labels))
        for i, (mode, part) in enumerate((("direct", "gather_s"), ("direct", "plan_s"),
                                          ("staged", "gather_s"), ("staged", "plan_s"))):
            ax.bar(x + (i - 1.5) * 0.2, [ok[k][mode][part] for k in labels], 0.2,
                   label="%s: %s" % (mode, part.replace("_s", "")))
        ax.set_xticks(x)
        ax.set_xticklabels(["%s tensors" % k for k in labels])
        ax.set_ylabel("seconds")
        ax.set_title("metas gather and planning per update (2 ranks)", fontsize=10)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out_plan, dpi=110)
        plt.close(fig)
    return None


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="0.25 GiB, 2 workers, 2 repeats (CI)")
    ap.add_argument("--full", action="store_true",
                    help="every size of --sizes with every worker count of --workers")
    ap.add_argument("--sizes", default="0.25,1,4", help="checkpoint sizes in GiB (default 0.25,1,4)")
    ap.add_argument("--workers", default="1,2,4", help="worker counts (default 1,2,4)")
    ap.add_argument("--dir", action="append", default=[],
                    help="also a safetensors file or directory (with 2 workers; repeatable)")
    ap.add_argument("--repeat", type=int, default=3, help="timed runs per row (default 3)")
    ap.add_argument("--publish", choices=("pull", "memfd"), default="pull",
                    help="how the trainer publishes: pull (the engine reads the trainer's "
                    "memory into shared memory it reuses every other step; default) or memfd "
                    "(a new sealed memfd per step)")
    ap.add_argument("--out", default=None,
                    help="folder for peers.json and the plots (default: BUILD/bench-out)")
    ap.add_argument("--work", default=None,
                    help="folder for the checkpoints and the disk rows (default: /var/tmp; "
                         "must be a disk, not tmpfs)")
    ap.add_argument("--build", default=os.environ.get("CKPT_BUILD_DIR",
                                                      os.path.join(SRC, "build", "release")))
    ap.add_argument("--plan-tensors", default="10000,100000",
                    help="tensor counts of the planning figure ('' for none)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder (logs)")
    a = ap.parse_args(argv)
    sizes = [float(s) for s in a.sizes.split(",") if s]
    workers = [int(w) for w in a.workers.split(",") if w]
    if a.quick:
        a.matrix = [(0.25, 2)]
        a.repeat = min(a.repeat, 2)
    elif a.full:
        a.matrix = [(s, n) for s in sizes for n in workers]
    else:
        # Within 10 minutes on 2 cores: every size with 2 workers, every worker count at
        # the size nearest 1 GiB, largest size with fewer repeats.
        mid = min(sizes, key=lambda s: abs(s - 1))
        a.matrix = sorted({(s, 2) for s in sizes} | {(mid, n) for n in workers})
    a.work = a.work or ("/var/tmp" if os.path.isdir("/var/tmp") else tempfile.gettempdir())
    a.out = a.out or os.path.join(a.build, "bench-out")
    a.plan_counts = [int(x) for x in a.plan_tensors.split(",") if x]
    return a


def main(argv=None):
    a = parse_args(sys.argv[1:] if argv is None else argv)
    # SIGTERM (a timeout) unwinds like an error: every block stops its processes and the
    # work folders are removed.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("bench: terminated"))
    os.makedirs(a.out, exist_ok=True)
    b = Bench(a)
    t_start = time.monotonic()
    cases = []
    try:
        progress("work folder %s (disk rows), %s (shm rows); torch: %s" % (
            b.work, b.shm, b.torch_py or b.torch_why))
        todo = [("%g GiB" % s, s, n) for s, n in a.matrix] + [("dir:" + d, d, 2) for d in a.dir]
        done_ckpt = {}
        for label, what, n in todo:
            if isinstance(what, float):
                if what not in done_ckpt:
                    for old in list(done_ckpt.values()):  # one generated checkpoint at a time
                        shutil.rmtree(old, ignore_errors=True)
                    done_ckpt.clear()
                    progress("generating a %s checkpoint" % label)
                    done_ckpt[what] = b.checkpoint("%dMiB" % round(what * 1024))
                ckpt = done_ckpt[what]
            else:
                ckpt = os.path.abspath(what)
            lay = pl.layout(ckpt)
            nbytes = sum(x[3] for x in lay)
            c = Case(label, ckpt, nbytes, len(lay), n)
            saved = a.repeat
            if nbytes > 2 * GIB and not a.full:
                a.repeat = min(a.repeat, 2)  # the largest checkpoint: fewer repeats by default
            b.run_case(c)
            a.repeat = saved
            cases.append(c)
        planning = b.planning(a.plan_counts) if a.plan_counts else {}
    finally:
        b.cleanup()
    rows = summarize(cases)
    doc = {"command": " ".join(["bench/peers.py"] + (sys.argv[1:] if argv is None else argv)),
           "machine": {"host": platform.node(), "cpus": os.cpu_count(),
                       "mem_total_gib": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB,
                       "kernel": platform.release()},
           "repeat": a.repeat, "elapsed_s": time.monotonic() - t_start,
           "torch_python": b.torch_py, "rows": rows, "flatness": flatness(rows),
           "planning": planning, "acceptance": acceptance(rows)}
    jpath = os.path.join(a.out, "peers.json")
    with open(jpath, "w") as f:
        json.dump(doc, f, indent=1)
    print(table(rows, planning))
    acc = doc["acceptance"]
    if "note" not in acc:
        print("\nacceptance at 1 GiB, 2 workers (peer's time / ckpt-engine's publish + direct):")
        for k in ("save.disk", "save.shm", "torch"):
            v = acc[k]
            print("  %-48s %s" % (LABEL[k], "%.2fx (want >= %.0fx): %s" % (
                v["speedup"], v["want"], "met" if v["met"] else "NOT met")
                if "speedup" in v else v["status"]))
        st, ps = acc["engine_stages_s"], acc["publish_stages_s"]
        if st and ps:
            print("where its time goes: registration %.2f s (memfd pages %.2f, copy %.2f, "
                  "send + engine checks and checksums %.2f), update %.2f s" % (
                      st["registration"], ps.get("memfd", 0), ps.get("copy", 0),
                      ps.get("send+register", 0), st["update"]))
    for k, v in sorted(doc["flatness"].items()):
        if "flat" in v and not k.startswith("floor."):
            print("s/GiB %-44s %s (x%.2f from smallest to largest)" % (
                LABEL[v["method"]] + ", %d w" % v["workers"], "flat" if v["flat"] else "GROWS",
                v["growth"]))
    why = plot(rows, planning, os.path.join(a.out, "peers.png"),
               os.path.join(a.out, "peers-planning.png"))
    print("\n" + (why or "plots: %s, %s" % (os.path.join(a.out, "peers.png"),
                                             os.path.join(a.out, "peers-planning.png"))))
    print("json: %s (%.0f s)" % (jpath, doc["elapsed_s"]))
    bad = [r for r in rows if r["status"] == "failed" or r["verified"] is False]
    bad += [{"label": "planning %s" % k} for k, v in planning.items() if not v.get("ok")]
    if bad:
        print("FAILED rows: " + "; ".join(r["label"] for r in bad))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
