"""Failures during a broadcast update: every one ends the update on every rank within the
timeout with a message naming the rank and the reason; surviving ranks stay up and the
next update works; workers always know whether their update completed."""
import os
import re
import signal
import subprocess
import time

import pytest

from mpijob import (ENGINE, MPI_ENV, WORKER, Deployment, InteractiveServe, corrupt_pool_byte,
                    gen, largest_tensor_needle, read_checkpoint, wait_log)

pytestmark = pytest.mark.skipif(not os.path.exists(WORKER), reason="ckpt-worker not built")


def assert_same(dep, r, model):
    got, want = read_checkpoint(dep.worker_dump(r)), read_checkpoint(model)
    for name, (_, _, data) in want.items():
        assert got[name][2] == data, "worker %d: %s" % (r, name)


@pytest.fixture
def setup(tmp_path):
    model = gen(tmp_path, size="4MiB", layers=2, shards=2)
    dep = Deployment(tmp_path, 2)
    yield model, dep
    dep.stop()


def faulty_rank1(model, dep, knob):
    """Worker 0 healthy, worker 1 with a fault knob; the checkpoint registered. The serve job."""
    dep.start_worker(0, ["--layout", model])
    dep.start_worker(1, ["--layout", model] + knob)
    srv = InteractiveServe(dep)
    assert srv.command("register m %s" % model)["ok"]
    return srv


def test_worker_error_then_next_update_works(setup):
    model, dep = setup
    srv = faulty_rank1(model, dep, ["--fail-on-bucket", "1"])
    try:
        res = srv.command("update m bucket=512KiB timeout=10000")
        assert not res["ok"] and res["failed_rank"] == 1, res
        assert "rank 1" in res["reason"] and "injected" in res["reason"], res
        dep.workers[1].kill()
        dep.workers[1].wait()
        dep.start_worker(1, ["--layout", model])
        res = srv.command("update m bucket=512KiB timeout=10000")
        assert res["ok"], res
    finally:
        assert srv.close() == 1  # one command failed
    # Worker 0 knows its first update did not complete, and the second did.
    first = wait_log(dep, 0, r"update (\d+) of 'm' version \d+: aborted \(")
    second = wait_log(dep, 0, r"update (\d+) of 'm' version \d+: complete")
    assert int(first.group(1)) < int(second.group(1)), dep.worker_log(0)


def test_worker_killed_mid_update(setup):
    model, dep = setup
    srv = faulty_rank1(model, dep, ["--stall-on-bucket", "1"])
    try:
        srv.send("update m bucket=512KiB timeout=20000")
        time.sleep(1.0)
        t0 = time.monotonic()
        dep.workers[1].send_signal(signal.SIGKILL)
        res = srv.result(timeout=30)
        assert not res["ok"] and res["failed_rank"] == 1, res
        assert time.monotonic() - t0 < 10, "a dead worker is seen at once, not at the timeout"
        dep.start_worker(1, ["--layout", model])
        assert srv.command("update m bucket=512KiB timeout=10000")["ok"]
    finally:
        srv.close()


def test_worker_stall_times_out(setup):
    model, dep = setup
    srv = faulty_rank1(model, dep, ["--stall-on-bucket", "1"])
    try:
        t0 = time.monotonic()
        res = srv.command("update m bucket=512KiB timeout=2000", timeout=30)
        took = time.monotonic() - t0
        assert not res["ok"] and res["failed_rank"] == 1, res
        assert "timed out" in res["reason"] or "ETIMEDOUT" in res["status"], res
        assert took < 15, took
        dep.workers[1].kill()
        dep.start_worker(1, ["--layout", model])
        assert srv.command("update m bucket=512KiB timeout=10000")["ok"]
    finally:
        srv.close()


def test_corrupted_pool_is_detected_when_staged(setup):
    """A byte corrupted in an owner's pool after registration (a bad DIMM, a stray write)
    is staged into an IPC bucket like any other (direct=0); the workers' verification
    fails the update naming the tensor's checksum. (The direct path: test_verify_direct.)"""
    model, dep = setup
    dep.start_worker(0, ["--layout", model, "--verify"])
    dep.start_worker(1, ["--layout", model, "--verify"])
    name, needle = largest_tensor_needle(model)
    srv = InteractiveServe(dep, extra_args=["--verify"])
    try:
        assert srv.command("register m %s" % model)["ok"]
        assert srv.command("update m bucket=512KiB timeout=10000 direct=0")["ok"]
        corrupt_pool_byte(srv.rank_pids(), needle)
        res = srv.command("update m bucket=512KiB timeout=10000 direct=0")
        assert not res["ok"] and res["status"] == "CKPT_ECHECKSUM" and res["direct"] == 0, res
        assert re.search(r"tensor '%s': checksum [0-9a-f]+, expected" % re.escape(name),
                         res["reason"]), res
    finally:
        srv.close()


def test_unknown_tensor_reported(setup, tmp_path):
    """Workers whose model lacks the checkpoint's tensors fail naming one of them."""
    import json, struct
    model, dep = setup
    header = json.dumps({"only.this": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}})
    header = header.encode() + b" " * ((8 - len(header) % 8) % 8)
    other = os.path.join(str(tmp_path), "other.safetensors")
    with open(other, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header + bytes(8))
    dep.start_worker(0, ["--layout", other])
    dep.start_worker(1, ["--layout", other])
    p, res = dep.serve(["register m %s" % model, "update m timeout=10000"])
    upd = [r for r in res if r["command"] == "update"][0]
    assert not upd["ok"] and "unknown tensor '" in upd["reason"], upd
    assert upd["failed_rank"] == 0, upd


def test_engine_rank_killed_mid_update(setup):
    model, dep = setup
    srv = faulty_rank1(model, dep, ["--stall-on-bucket", "1"])
    try:
        srv.send("update m bucket=512KiB timeout=8000")
        time.sleep(1.0)
        pids = srv.rank_pids()
        assert len(pids) == 2, pids
        t0 = time.monotonic()
        os.kill(pids[1], signal.SIGKILL)
        rc = srv.proc.wait(timeout=30)
        assert rc != 0
        assert time.monotonic() - t0 < 20
        err = srv.proc.stderr.read()
        # mpirun names the killed rank and the signal, not merely "a rank".
        assert re.search(r"rank 1\b.*signal 9", err), err
    finally:
        srv.close()
    # Worker 0 learns its update did not complete (engine gone: connection closed).
    wait_log(dep, 0, r"update \d+ of 'm' version \d+: aborted \(")
    log = dep.worker_log(0)
    assert ": complete" not in log, log


def test_stalled_rank_hits_collective_timeout(setup):
    """A rank stopped (SIGSTOP) between commands: the other rank's collective gives up after
    --timeout-ms instead of waiting forever, says so, and aborts the job with exit 3."""
    model, dep = setup
    for r in range(2):
        dep.start_worker(r, ["--layout", model])
    srv = InteractiveServe(dep, extra_args=["--timeout-ms", "2000"])
    pids = []
    try:
        assert srv.command("register m %s" % model)["ok"]
        pids = srv.rank_pids()
        assert len(pids) == 2, pids
        os.kill(pids[1], signal.SIGSTOP)
        t0 = time.monotonic()
        srv.send("update m bucket=512KiB timeout=2000")
        rc = srv.proc.wait(timeout=60)
        took = time.monotonic() - t0
        err = srv.proc.stderr.read()
        assert rc == 3, (rc, err)
        assert re.search(r"rank 0: no answer from the other ranks within \d+ ms during \w", err), err
        # The stopped rank is on this host: it is named, with its pid and state.
        stopped = re.search(r"on this host: rank 1 \(pid (\d+)\) is stopped", err)
        assert stopped and int(stopped.group(1)) == pids[1], err
        assert "aborting the MPI job" in err, err
        assert 1.5 < took < 30, took  # the timeout, not a hang nor an immediate failure
    finally:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGCONT)
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        srv.close()


def rank_of(pid):
    with open("/proc/%d/environ" % pid, "rb") as f:
        env = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
    return int(env[b"OMPI_COMM_WORLD_RANK"])


def test_rank_stopped_mid_update_is_named(setup):
    """A rank stopped (SIGSTOP) in the middle of an update, between two buckets: rank 0
    hears every rank's word in the agreement itself, so it names the silent one, with its
    pid and what /proc says (stopped), not just "a rank died or stalled"."""
    model, dep = setup
    dep.start_worker(0, ["--layout", model])
    dep.start_worker(1, ["--layout", model, "--stall-on-bucket", "2"])
    srv = InteractiveServe(dep, extra_args=["--timeout-ms", "2000"])
    pids = []
    try:
        assert srv.command("register m %s" % model)["ok"]
        pids = srv.rank_pids()
        by_rank = {rank_of(p): p for p in pids}
        srv.send("update m bucket=512KiB timeout=2000 direct=0")
        # Rank 1 now waits (at most the timeout) for its stalled worker: stop it there.
        wait_log(dep, 1, r"stalling on bucket 2")
        os.kill(by_rank[1], signal.SIGSTOP)
        rc = srv.proc.wait(timeout=60)
        err = srv.proc.stderr.read()
        assert rc == 3, (rc, err)
        assert re.search(r"rank 0: 1 of 1 ranks did not answer within \d+ ms during agreement "
                         r"\(dead, stalled or unreachable\): rank 1 \(pid %d on this host, "
                         r"[^)]*\) is stopped" % by_rank[1], err), err
    finally:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGCONT)
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        srv.close()


def test_failed_registration_leaves_nothing(setup, tmp_path):
    """A truncated shard fails the registration on every rank, naming the file; the name is
    free again afterwards (no rank kept a half-registered share) and updates still work."""
    import shutil
    model, dep = setup
    bad = os.path.join(str(tmp_path), "bad")
    shutil.copytree(model, bad)
    shard = sorted(f for f in os.listdir(bad) if f.endswith(".safetensors"))[-1]
    path = os.path.join(bad, shard)
    os.truncate(path, os.path.getsize(path) - 1000)
    for r in range(2):
        dep.start_worker(r, ["--layout", model, "--verify"], updates=1)
    p, res = dep.serve(["register m %s" % bad, "register m %s" % model, "update m"])
    reg_bad, reg_good = [r for r in res if r["command"] == "register"]
    assert not reg_bad["ok"] and shard in reg_bad["reason"], reg_bad
    assert reg_good["ok"], reg_good
    assert [r for r in res if r["command"] == "update"][0]["ok"]
