"""No silently mixed weights (protocol 3): BEGIN carries the update's manifest and a worker
whose model the update does not cover refuses it before any byte lands, unless the update
is marked partial; every worker ends with the same outcome (COMMIT / ABORT after FINISH)."""
import os
import shutil
import time

import pytest

from mpijob import WORKER, Deployment, InteractiveServe, assert_worker_equals, gen, \
    read_checkpoint, read_safetensors, wait_log

pytestmark = pytest.mark.skipif(not os.path.exists(WORKER), reason="ckpt-worker not built")


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


def flipped_shard(model, tmp_path):
    """A copy of the model's last shard with every tensor byte changed (header intact)."""
    shard = sorted(f for f in os.listdir(model) if f.endswith(".safetensors"))[-1]
    out = os.path.join(str(tmp_path), "part.safetensors")
    shutil.copy(os.path.join(model, shard), out)
    with open(out, "r+b") as f:
        n = int.from_bytes(f.read(8), "little")
        f.seek(8 + n)
        data = bytearray(f.read())
        for i in range(len(data)):
            data[i] ^= 0xA5
        f.seek(8 + n)
        f.write(data)
    return out


@pytest.mark.parametrize("layout", [True, False], ids=["layout", "model-from-first-update"])
def test_one_shard_refused_unless_partial(tmp_path, layout):
    """With --layout the worker knows its model from the start; without, the first
    complete update defines it: either way one shard alone is refused unless partial."""
    model = gen(tmp_path, size="4MiB", layers=2, shards=2)
    part = flipped_shard(model, tmp_path)
    dep = Deployment(tmp_path, 2)
    for r in range(2):
        dep.start_worker(r, ["--layout", model] if layout else [])
    srv = InteractiveServe(dep)
    try:
        assert srv.command("register m %s" % model)["ok"]
        assert srv.command("update m bucket=512KiB timeout=10000")["ok"]
        for r in range(2):
            wait_log(dep, r, r"update \d+ of 'm' version \d+: complete")
            dump_equals(dep, r, model)
        assert srv.command("register part %s" % part)["ok"]
        res = srv.command("update part bucket=512KiB timeout=10000")
        assert not res["ok"], res
        # Refused at BEGIN, naming the worker and what the update lacks.
        assert "missing from the update" in res["reason"] and "partial=1" in res["reason"], res
        assert "worker pid" in res["reason"], res
        for r in range(2):
            wait_log(dep, r, r"update refused: .*missing from the update")
            dump_equals(dep, r, model)  # the dump of the old update, untouched
        res = srv.command("update part bucket=512KiB timeout=10000 partial=1")
        assert res["ok"], res
    finally:
        srv.close()
    want_old, want_new = read_checkpoint(model), read_safetensors(part)
    for r in range(2):
        wait_log(dep, r, r"update \d+ of 'part' version \d+: complete")
        wait_log(dep, r, r"state: consistent at version")  # printed after the dump
        got = read_checkpoint(dep.worker_dump(r))
        assert set(got) == set(want_old)
        for name, (_, _, data) in got.items():
            # The partial update's tensors are new; every other tensor kept the old bytes
            # (the refused update wrote nothing into the model).
            expect = want_new[name][2] if name in want_new else want_old[name][2]
            assert data == expect, "worker %d: %s" % (r, name)
    dep.stop()


def test_post_hook_death_leaves_the_other_worker_incomplete(tmp_path):
    model = gen(tmp_path, size="4MiB", layers=2, shards=2)
    dep = Deployment(tmp_path, 2)
    dep.start_worker(0, ["--layout", model])
    dep.start_worker(1, ["--layout", model, "--die-in-post-hook"])
    srv = InteractiveServe(dep)
    try:
        assert srv.command("register m %s" % model)["ok"]
        res = srv.command("update m bucket=512KiB timeout=10000")
        assert not res["ok"] and res["failed_rank"] == 1, res
    finally:
        srv.close()
    wait_log(dep, 0, r"update \d+ of 'm' version \d+: incomplete \(aborted")
    wait_log(dep, 0, r"state: incomplete since version 0")
    assert ": complete" not in dep.worker_log(0), dep.worker_log(0)
    dep.stop()
