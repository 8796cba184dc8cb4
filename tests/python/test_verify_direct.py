"""Checksum verification on the default update path: with every rank on one host the
update is DIRECT (workers read the ranks' pools in place, nothing is staged), and verify=1
must still catch a byte that changed in a pool after registration. The staged path has its
own test (test_update_failures.py: test_corrupted_ipc_buffer_is_detected, which forces the
staged path)."""
import os

import pytest

from mpijob import (WORKER, Deployment, InteractiveServe, gen, pool_files, read_checkpoint,
                    wait_log)

pytestmark = pytest.mark.skipif(not os.path.exists(WORKER), reason="ckpt-worker not built")


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


def test_verify_catches_corrupt_pool_on_direct_update(tmp_path):
    model = gen(tmp_path, size="4MiB", layers=2, shards=2)
    tensors = read_checkpoint(model)
    # The largest tensor: 64 bytes from its middle are unique in the pools.
    name, (_, _, data) = max(tensors.items(), key=lambda kv: len(kv[1][2]))
    needle = data[len(data) // 2:len(data) // 2 + 64]
    dep = Deployment(tmp_path, 2)
    for r in range(2):
        dep.start_worker(r, ["--layout", model])
    srv = InteractiveServe(dep)
    try:
        assert srv.command("register m %s" % model)["ok"]
        # Untouched pools: the update (direct, verified) passes.
        res = srv.command("update m verify=1 timeout=10000")
        assert res["ok"] and res["direct"] == 1, res
        for r in range(2):
            wait_log(dep, r, r"update \d+ of 'm' version \d+: complete")
        pid, link, at = corrupt_pool_byte(srv.rank_pids(), needle)
        # The same update now fails, naming the tensor and its checksum.
        res = srv.command("update m verify=1 timeout=10000")
        assert not res["ok"] and res["direct"] == 1, res
        assert "checksum" in res["reason"] and name in res["reason"], (res, name, link, at)
        # The workers know that update did not complete.
        for r in range(2):
            wait_log(dep, r, r"update %d of 'm' version \d+: (aborted|incomplete)"
                     % res["update_id"])
    finally:
        srv.close()
        dep.stop()
