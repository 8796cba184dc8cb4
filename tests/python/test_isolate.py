"""One bad worker does not stop the fleet (opt-in): with isolate=1 a worker that dies, fails
or stalls mid-update is cut out of the rest of the update and named in the result (rank,
pid, reason), the three others complete and hold the checkpoint byte for byte, the
isolated one is told the update is incomplete for it (when it can still hear), and the
deployment takes the next update. Without isolate one worker's failure aborts all (the
default, asserted too). Real ranks (mpirun -np 4) and real ckpt-worker processes."""
import os
import re
import time

import pytest

from mpijob import (WORKER, Deployment, InteractiveServe, assert_worker_equals, gen,
                    read_checkpoint, read_safetensors, wait_log)
from test_http_engine import HttpServe
from test_manifest import flipped_shard

pytestmark = pytest.mark.skipif(not os.path.exists(WORKER), reason="ckpt-worker not built")

N = 4
BAD = 2  # the rank whose worker misbehaves


def dump_equals(dep, r, model, timeout=20):
    """The worker prints its outcome before it writes the dump: wait for the dump."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return assert_worker_equals(dep, r, model)
        except (AssertionError, OSError, ValueError, KeyError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def start(tmp_path, knob, model=None):
    """4 workers with the checkpoint's layout, BAD's with a fault knob; the serve job with
    the checkpoint registered."""
    model = model or gen(tmp_path, size="4MiB", layers=2, shards=2)
    dep = Deployment(tmp_path, N)
    for r in range(N):
        dep.start_worker(r, ["--layout", model] + (knob if r == BAD else []))
    srv = InteractiveServe(dep)
    assert srv.command("register m %s" % model)["ok"]
    return model, dep, srv


def update_id(res):
    return res["update_id"]


def assert_others_complete(dep, model, uid):
    for r in range(N):
        if r == BAD:
            continue
        wait_log(dep, r, r"update %d of 'm' version \d+: complete" % uid)
        wait_log(dep, r, r"state: consistent at version")
        dump_equals(dep, r, model)


def assert_isolated(res, pid, *texts):
    assert res["ok"] and res["status"] == "CKPT_OK", res
    assert res["nisolated"] == 1 and len(res["isolated"]) == 1, res
    w = res["isolated"][0]
    assert w["rank"] == BAD and w["worker"] == pid, res
    for t in texts:
        assert t in w["reason"], (t, res)
    return w


@pytest.mark.parametrize("direct", [1, 0], ids=["direct", "staged"])
def test_worker_killed_mid_update_is_isolated(tmp_path, direct):
    model, dep, srv = start(tmp_path, ["--die-on-bucket", "2"])
    pid = dep.workers[BAD].pid
    try:
        res = srv.command("update m bucket=512KiB timeout=10000 isolate=1 direct=%d" % direct)
        w = assert_isolated(res, pid, "bucket 2")
        assert w["status"] == "CKPT_EPEER", res
        assert res["buckets"] > 3, res  # the others went on past the bucket it died on
        assert dep.workers[BAD].wait(timeout=10) < 0  # killed by its knob, not by us
        wait_log(dep, BAD, r"dying on bucket 2")
        assert_others_complete(dep, model, update_id(res))
        # The deployment takes the next update (default options) once the worker is back.
        dep.start_worker(BAD, ["--layout", model])
        res = srv.command("update m bucket=512KiB timeout=10000 direct=%d" % direct)
        assert res["ok"] and res["isolated"] == [], res
        for r in range(N):
            wait_log(dep, r, r"update %d of 'm' version \d+: complete" % update_id(res))
    finally:
        srv.close()
        dep.stop()
    for r in range(N):
        dump_equals(dep, r, model)


def test_worker_killed_without_isolate_aborts_all(tmp_path):
    model, dep, srv = start(tmp_path, ["--die-on-bucket", "2"])
    try:
        res = srv.command("update m bucket=512KiB timeout=10000")
        assert not res["ok"] and res["failed_rank"] == BAD, res
        assert "rank %d" % BAD in res["reason"] and res["isolated"] == [], res
        for r in range(N):
            if r != BAD:
                wait_log(dep, r, r"update %d of 'm' version \d+: aborted \(" % res["update_id"])
                assert ": complete" not in dep.worker_log(r), dep.worker_log(r)
    finally:
        srv.close()
        dep.stop()


def test_failing_worker_is_isolated_and_told(tmp_path):
    model, dep, srv = start(tmp_path, ["--fail-on-bucket", "1"])
    pid = dep.workers[BAD].pid
    try:
        res = srv.command("update m bucket=512KiB timeout=10000 isolate=1")
        assert_isolated(res, pid, "bucket 1", "injected failure", "worker pid %d" % pid)
        assert_others_complete(dep, model, update_id(res))
        # Told: ABORT naming the isolation, its state incomplete; it stays connected and
        # serves its old weights.
        wait_log(dep, BAD, r"update %d of 'm' version \d+: aborted \(.*update %d: this worker "
                 r"was isolated \(worker pid %d on .*: bucket 1: injected failure\); the other workers "
                 r"complete the update without it\)" % (res["update_id"], res["update_id"], pid))
        wait_log(dep, BAD, r"state: incomplete since version 0")
        assert dep.workers[BAD].poll() is None
    finally:
        srv.close()
        dep.stop()


def test_stalled_worker_is_isolated(tmp_path):
    model, dep, srv = start(tmp_path, ["--stall-on-bucket", "1"])
    pid = dep.workers[BAD].pid
    try:
        t0 = time.monotonic()
        res = srv.command("update m bucket=512KiB timeout=3000 isolate=1", timeout=60)
        took = time.monotonic() - t0
        w = assert_isolated(res, pid, "no answer to bucket 1 within 3000 ms")
        assert w["status"] == "CKPT_ETIMEDOUT", res
        assert took < 20, "the stall held the others %.1f s" % took
        assert_others_complete(dep, model, update_id(res))
        # Back with a live worker, the next update is complete everywhere.
        dep.workers[BAD].kill()
        dep.workers[BAD].wait()
        dep.start_worker(BAD, ["--layout", model])
        res = srv.command("update m bucket=512KiB timeout=10000 isolate=1")
        assert res["ok"] and res["isolated"] == [], res
        dump_equals(dep, BAD, model)
    finally:
        srv.close()
        dep.stop()


def test_http_and_cli_isolate(tmp_path):
    """"isolate": true on the HTTP request and --isolate on the CLI reach the engine; the
    update's status lists the isolated worker; a bad type is a 400 naming the field."""
    model = gen(tmp_path, size="4MiB", layers=2, shards=2)
    dep = Deployment(tmp_path, N)
    for r in range(N):
        dep.start_worker(r, ["--layout", model] + (["--fail-on-bucket", "1"] if r == BAD else []))
    pid = dep.workers[BAD].pid
    srv = HttpServe(dep)
    try:
        p = srv.cli("register", "m", model, "--wait")
        assert p.returncode == 0, p.stdout + p.stderr
        for field, value in (("isolate", 1), ("isolate", "yes"), ("partial", "yes")):
            code, err = srv.request("POST", "/v1/checkpoints/m/update", {field: value})
            assert code == 400 and err["field"] == field, err
            assert "'%s' must be true or false" % field in err["error"], err
        code, obj = srv.request("POST", "/v1/checkpoints/m/update",
                                {"isolate": True, "bucket_max": "512KiB", "timeout_ms": 10000})
        assert code == 202, obj
        u = srv.wait_update(obj["update_id"], timeout=60)
        assert u["state"] == "succeeded" and u["status"] == 0 and u["isolate"], u
        assert u["nisolated"] == 1 and len(u["isolated"]) == 1, u
        w = u["isolated"][0]
        assert w["rank"] == BAD and w["worker"] == pid and "injected failure" in w["reason"], u
        assert_others_complete(dep, model, u["update_id"])

        p = srv.cli("update", "m", "--isolate", "--bucket-max", "512KiB", "--wait")
        assert p.returncode == 0 and "succeeded" in p.stdout, p.stdout + p.stderr
        assert re.search(r"isolated rank %d's worker \(pid %d\): .*injected failure" % (BAD, pid),
                         p.stderr), p.stderr
        # Without isolate the same worker fails the update for all.
        p = srv.cli("update", "m", "--bucket-max", "512KiB", "--wait")
        assert p.returncode == 1 and "failed on rank %d" % BAD in p.stderr, p.stdout + p.stderr
        u = srv.get("/v1/updates/3")
        assert u["state"] == "failed" and not u["isolate"] and u["isolated"] == [], u
    finally:
        if srv.proc.poll() is None:
            srv.stop()
        dep.stop()


def test_http_and_cli_partial(tmp_path):
    """A checkpoint holding half the model updates workers that set their model only with
    "partial": true (HTTP) or --partial (CLI); without it they refuse, naming the option."""
    model = gen(tmp_path, size="4MiB", layers=2, shards=2)
    part = flipped_shard(model, tmp_path)
    dep = Deployment(tmp_path, 2)
    for r in range(2):
        dep.start_worker(r, ["--layout", model])
    srv = HttpServe(dep)
    try:
        for name, path in (("m", model), ("part", part)):
            p = srv.cli("register", name, path, "--wait")
            assert p.returncode == 0, p.stdout + p.stderr
        p = srv.cli("update", "m", "--bucket-max", "512KiB", "--wait")
        assert p.returncode == 0, p.stdout + p.stderr
        for r in range(2):
            dump_equals(dep, r, model)

        code, obj = srv.request("POST", "/v1/checkpoints/part/update", {"bucket_max": "512KiB"})
        u = srv.wait_update(obj["update_id"], timeout=60)
        assert u["state"] == "failed" and not u["partial"], u
        assert "missing from the update" in u["reason"] and "partial" in u["reason"], u
        p = srv.cli("update", "part", "--bucket-max", "512KiB", "--wait")
        assert p.returncode == 1 and "missing from the update" in p.stderr, p.stdout + p.stderr
        # With isolate every worker refusing at BEGIN is isolated: none is left, so the
        # update fails, listing them all.
        code, obj = srv.request("POST", "/v1/checkpoints/part/update", {"isolate": True})
        u = srv.wait_update(obj["update_id"], timeout=60)
        assert u["state"] == "failed" and "every worker was isolated (2 of 2)" in u["reason"], u
        assert [w["rank"] for w in u["isolated"]] == [0, 1], u
        assert all("missing from the update" in w["reason"] for w in u["isolated"]), u

        code, obj = srv.request("POST", "/v1/checkpoints/part/update",
                                {"partial": True, "bucket_max": "512KiB"})
        assert code == 202, obj
        u = srv.wait_update(obj["update_id"], timeout=60)
        assert u["state"] == "succeeded" and u["partial"], u
        for r in range(2):
            wait_log(dep, r, r"update %d of 'part' version \d+: complete" % u["update_id"])
        p = srv.cli("update", "part", "--partial", "--bucket-max", "512KiB", "--wait")
        assert p.returncode == 0 and "succeeded" in p.stdout, p.stdout + p.stderr
        uid = int(re.search(r"update (\d+) of 'part' succeeded", p.stdout).group(1))
        for r in range(2):
            wait_log(dep, r, r"update %d of 'part' version \d+: complete" % uid)
            wait_log(dep, r, r"state: consistent at version")
    finally:
        if srv.proc.poll() is None:
            srv.stop()
        dep.stop()
    # The partial update's tensors are new, every other tensor kept the full update's bytes.
    want_old, want_new = read_checkpoint(model), read_safetensors(part)
    for r in range(2):
        got = read_checkpoint(dep.worker_dump(r))
        assert set(got) == set(want_old)
        for name, (_, _, data) in got.items():
            expect = want_new[name][2] if name in want_new else want_old[name][2]
            assert data == expect, "worker %d: %s" % (r, name)
