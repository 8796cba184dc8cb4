"""Workers are never a rank's problem, and workers outlive their engine.

A silent worker (a process that connects to rank 1's socket and never reads it: a hung
inference process) must not bring the deployment down in any command: registration does
not wait for workers at all, and the one command that needs the worker (an update) fails
naming rank 1 and that worker, after which the next commands work. And a worker waits for
its engine for as long as it takes: the whole engine job killed, a pause longer than every
timeout, a new `serve` on the same socket directory updates the same running workers."""
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

import mpijob
from mpijob import (WORKER, Deployment, InteractiveServe, assert_worker_equals, gen,
                    read_checkpoint)

pytestmark = pytest.mark.skipif(not os.path.exists(WORKER), reason="ckpt-worker not built")

SRC = os.environ.get("CKPT_SOURCE_DIR", os.path.join(os.path.dirname(__file__), "..", ".."))
PYDIR = os.path.join(SRC, "python")

SILENT_SCRIPT = textwrap.dedent("""
    import socket, sys, time
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    while True:
        try:
            s.connect(sys.argv[1])
            break
        except OSError:
            time.sleep(0.05)
    print("connected", flush=True)
    time.sleep(3600)  # never reads, never answers
""")


class Silent:
    """A process connected to a worker socket that never reads it."""

    def __init__(self, tmp, path):
        script = os.path.join(str(tmp), "silent.py")
        with open(script, "w") as f:
            f.write(SILENT_SCRIPT)
        self.proc = subprocess.Popen([sys.executable, script, path], stdout=subprocess.PIPE,
                                     text=True)
        assert self.proc.stdout.readline().strip() == "connected"
        self.pid = self.proc.pid

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def wait_for(pred, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.1)
    raise AssertionError("not within %s s: %s" % (timeout, what))


def assert_dump_equals(dep, r, model):
    """The worker writes its dump right after it reports the update complete: poll."""
    deadline = time.monotonic() + 15
    while True:
        try:
            assert_worker_equals(dep, r, model)
            return
        except (AssertionError, OSError, ValueError, KeyError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def assert_names_silent(res, silent):
    assert not res["ok"] and res["failed_rank"] == 1, res
    assert "rank 1" in res["reason"] and "worker pid %d" % silent.pid in res["reason"], res


def test_silent_worker_register_update_unregister(tmp_path):
    """Default serve timeouts (30 s): registering twice and unregistering take no time
    although rank 1's worker never answers; the update (its own timeout=3000, same ratio to
    the ranks' bound) fails naming rank 1 and the silent pid; with a real worker in its
    place the next update verifies byte for byte."""
    model = gen(tmp_path, size="4MiB", layers=2, shards=2)
    dep = Deployment(tmp_path, 2)
    dep.start_worker(0, ["--layout", model, "--verify"])
    srv = InteractiveServe(dep)
    silent = Silent(tmp_path, os.path.join(dep.sock, "rank-1.sock"))
    try:
        t0 = time.monotonic()
        assert srv.command("register m %s" % model)["ok"]
        # A second registration is a collective with rank 1: it answers at once only if
        # rank 1 did not wait for its worker's answer to the first one's PREPARE.
        assert srv.command("register m2 %s" % model)["ok"]
        assert srv.command("unregister m2")["ok"]
        took = time.monotonic() - t0
        assert took < 10, "registration waited for the silent worker (%.1f s)" % took
        res = srv.command("update m bucket=512KiB timeout=3000", timeout=60)
        assert_names_silent(res, silent)
        assert "PREPARE" in res["reason"], res  # the answer it owed since registration
        silent.kill()
        dep.start_worker(1, ["--layout", model, "--verify"])
        res = srv.command("update m bucket=512KiB timeout=10000 verify=1")
        assert res["ok"], res
        assert srv.command("unregister m")["ok"]
    finally:
        silent.kill()
        rc = srv.close()
        dep.stop()
    assert rc in (0, 1), "the deployment did not survive: exit %s" % rc
    for r in range(2):
        assert_dump_equals(dep, r, model)


def test_silent_worker_short_timeouts_every_command(tmp_path):
    """--timeout-ms 2000 for everything: register (with a publish-style second one),
    update, export, unregister, then the silent worker replaced and an update verified."""
    model = gen(tmp_path, size="4MiB", layers=2, shards=2)
    dep = Deployment(tmp_path, 2)
    dep.start_worker(0, ["--layout", model, "--verify"])
    srv = InteractiveServe(dep, ["--timeout-ms", "2000"])
    silent = Silent(tmp_path, os.path.join(dep.sock, "rank-1.sock"))
    try:
        assert srv.command("register m %s" % model)["ok"]
        time.sleep(2.5)  # past the worker timeout: no rank may still be waiting on it
        assert srv.command("register m2 %s" % model)["ok"]
        res = srv.command("update m bucket=512KiB", timeout=60)
        assert_names_silent(res, silent)
        assert srv.command("export m %s" % os.path.join(str(tmp_path), "metas.json"))["ok"]
        assert srv.command("unregister m2")["ok"]
        silent.kill()
        dep.start_worker(1, ["--layout", model, "--verify"])
        assert srv.command("update m bucket=512KiB verify=1")["ok"]
    finally:
        silent.kill()
        rc = srv.close()
        dep.stop()
    assert rc in (0, 1), "the deployment did not survive: exit %s" % rc
    for r in range(2):
        assert_dump_equals(dep, r, model)


def test_silent_worker_p2p_joiner(tmp_path, monkeypatch):
    """A joining deployment whose rank 1 has a silent worker: the P2P update fails naming
    rank 1 and the pid, the serving deployment is untouched, the retry with a real worker
    pulls every byte."""
    monkeypatch.setattr(mpijob, "MPI_ENV", dict(mpijob.MPI_ENV, UCX_TLS="shm,self"))
    model = gen(tmp_path, size="4MiB", layers=2, shards=2)
    sdir, jdir = tmp_path / "serving", tmp_path / "joining"
    sdir.mkdir()
    jdir.mkdir()
    sdep, jdep = Deployment(sdir, 2), Deployment(jdir, 2)
    for r in range(2):
        sdep.start_worker(r, ["--layout", model])
    srv = InteractiveServe(sdep, ["--timeout-ms", "3000"])
    jsrv = silent = None
    try:
        assert srv.command("register m %s" % model)["ok"]
        metas = str(tmp_path / "metas.json")
        assert srv.command("export m %s" % metas)["ok"]
        jdep.start_worker(0, ["--layout", model, "--verify"])
        jsrv = InteractiveServe(jdep, ["--timeout-ms", "3000"])
        silent = Silent(tmp_path, os.path.join(jdep.sock, "rank-1.sock"))
        res = jsrv.command("p2p-update %s bucket=1MiB" % metas, timeout=90)
        assert_names_silent(res, silent)
        silent.kill()
        jdep.start_worker(1, ["--layout", model, "--verify"])
        res = jsrv.command("p2p-update %s bucket=1MiB verify=1" % metas, timeout=90)
        assert res["ok"] and res["p2p"] == 1, res
        assert srv.command("export m %s.again" % metas)["ok"]  # serving side still up
    finally:
        if silent:
            silent.kill()
        jrc = jsrv.close() if jsrv else None
        srv.close()
        sdep.stop()
        jdep.stop()
    assert jrc in (0, 1), "the joining deployment did not survive: exit %s" % jrc
    for r in range(2):
        assert_dump_equals(jdep, r, model)
        assert "update" not in sdep.worker_log(r)


PY_WORKER = textwrap.dedent("""
    import hashlib, json, sys
    import numpy as np
    sys.path[:0] = [sys.argv[1], sys.argv[2]]
    from ckpt_engine import follow
    from mpijob import read_checkpoint
    params = {n: np.zeros(len(d), dtype=np.uint8)
              for n, (_, _, d) in read_checkpoint(sys.argv[4]).items()}
    for res in follow(sys.argv[3], params, verify=True):  # waits for engines forever
        sums = {n: hashlib.sha256(a.tobytes()).hexdigest() for n, a in params.items()}
        print(json.dumps({"completed": res.completed, "version": res.version,
                          "reason": res.reason, "sums": sums}), flush=True)
""")


def kill_engine_job(srv):
    """kill -9 of every rank and of mpirun: nothing gets to say goodbye."""
    for pid in srv.rank_pids():
        os.kill(pid, signal.SIGKILL)
    srv.proc.send_signal(signal.SIGKILL)
    srv.proc.wait(timeout=30)


def test_workers_outlive_engine_restart(tmp_path):
    """2 workers (ckpt-worker, and a Python worker on follow()) keep running while the
    whole engine job is killed and nothing listens for 3 x the longest timeout; a new
    serve on the same socket directory updates the same processes, byte for byte."""
    a = gen(tmp_path, size="4MiB", layers=2, shards=2, name="a")
    b = os.path.join(str(tmp_path), "b")  # same layout, other bytes
    subprocess.run([mpijob.ENGINE, "gen", "--out", b, "--size", "4MiB", "--layers", "2",
                    "--shards", "2", "--seed", "7"], check=True, capture_output=True)
    assert read_checkpoint(a) != read_checkpoint(b)
    dep = Deployment(tmp_path, 2)
    w0 = dep.start_worker(0, ["--layout", a, "--verify", "--timeout-ms", "2000"])
    script = os.path.join(str(tmp_path), "pyworker.py")
    with open(script, "w") as f:
        f.write(PY_WORKER)
    env = dict(os.environ, CKPT_BUILD_DIR=mpijob.BUILD)
    pylog = open(os.path.join(str(tmp_path), "pyworker.log"), "w")
    py = subprocess.Popen([sys.executable, script, PYDIR, os.path.dirname(__file__),
                           os.path.join(dep.sock, "rank-1.sock"), a],
                          stdout=subprocess.PIPE, stderr=pylog, text=True, env=env)

    def py_result(want_version):
        line = py.stdout.readline()
        assert line, "the Python worker exited: " + open(pylog.name).read()
        res = json.loads(line)
        assert res["completed"] and res["version"] == want_version, res
        return res["sums"]

    def assert_py_equals(sums, model):
        import hashlib
        want = {n: hashlib.sha256(d).hexdigest() for n, (_, _, d) in read_checkpoint(model).items()}
        assert sums == want

    srv = InteractiveServe(dep, ["--timeout-ms", "2000"])
    try:
        assert srv.command("register m %s" % a)["ok"]
        res = srv.command("update m bucket=512KiB verify=1")
        assert res["ok"], res
        assert_py_equals(py_result(res["version"]), a)
        assert_dump_equals(dep, 0, a)

        kill_engine_job(srv)
        killed = time.monotonic()
        # Positive signal: both workers say they are waiting for an engine ...
        wait_for(lambda: "waiting for an engine at" in dep.worker_log(0), 15, "ckpt-worker log")
        wait_for(lambda: "waiting for an engine at" in open(pylog.name).read(), 15,
                 "Python worker log")
        # ... and keep waiting past 3 x the longest timeout (2 s here; the ranks' 11 s
        # bound never applies to a dead job).
        time.sleep(max(0, killed + 6.5 - time.monotonic()))
        assert w0.poll() is None and py.poll() is None, "a worker gave up on its engine"

        srv = InteractiveServe(dep, ["--timeout-ms", "2000"])
        assert srv.command("register m %s" % b)["ok"]
        res = srv.command("update m bucket=512KiB verify=1")
        assert res["ok"], res
        assert_py_equals(py_result(res["version"]), b)
        assert_dump_equals(dep, 0, b)
        assert w0.poll() is None and py.poll() is None  # the same processes
    finally:
        srv.close()
        dep.stop()
        if py.poll() is None:
            py.kill()
        py.wait()
        pylog.close()
