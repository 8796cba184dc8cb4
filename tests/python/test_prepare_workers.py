"""Registration prepares the workers: on one host the engine sends every connected worker
a PREPARE (docs/PROTOCOL.md) right after `register`, so the first direct update finds the
pools already mapped. Best effort and asynchronous, so nothing fails when it stops
happening; this test notices: the workers must map the very pools that hold the
checkpoint, before any update."""
import os
import re

import pytest

from mpijob import (WORKER, Deployment, InteractiveServe, gen, pool_files, read_checkpoint,
                    wait_log)

pytestmark = pytest.mark.skipif(not os.path.exists(WORKER), reason="ckpt-worker not built")


def checkpoint_pools(pids, needles):
    """Inodes of the files the ranks hold that contain the checkpoint's tensors."""
    inodes = set()
    for pid in pids:
        for path, link, size in pool_files(pid):
            with open(path, "rb") as f:
                data = f.read()
            if any(n in data for n in needles):
                inodes.add(os.stat(path).st_ino)
    return inodes


def mapped_inodes(pid):
    out = set()
    with open("/proc/%d/maps" % pid) as f:
        for line in f:
            fields = line.split()
            if len(fields) >= 6 and fields[4] != "0":
                out.add(int(fields[4]))
    return out


def test_register_prepares_workers(tmp_path, monkeypatch):
    model = gen(tmp_path, size="4MiB", layers=2, shards=2)
    needles = [d[:64] for _, _, d in read_checkpoint(model).values() if len(d) >= 64]
    dep = Deployment(tmp_path, 2)
    # The workers log their connection (info) and the receiver its PREPARE (debug).
    monkeypatch.setenv("CKPT_LOG_LEVEL", "debug")
    for r in range(2):
        dep.start_worker(r, ["--layout", model])
    srv = InteractiveServe(dep)
    try:
        # Only workers connected at registration are prepared (a later one maps at its
        # first BEGIN): register once both are.
        for r in range(2):
            wait_log(dep, r, r"connected to ")
        assert srv.command("register m %s" % model)["ok"]
        pools = checkpoint_pools(srv.rank_pids(), needles)
        assert len(pools) >= 2, pools  # each rank's shard is in a pool of its own
        for r in range(2):
            wait_log(dep, r, r"ipc: %d buffers mapped ahead of the next update" % len(pools))
            # The very pools that hold 'm' are mapped in the worker, before any update.
            pid = dep.workers[r].pid
            mapped = mapped_inodes(pid)
            assert pools <= mapped, (r, sorted(pools), sorted(mapped))
            assert not re.search(r"update \d+ of", dep.worker_log(r)), dep.worker_log(r)
    finally:
        srv.close()
        dep.stop()
