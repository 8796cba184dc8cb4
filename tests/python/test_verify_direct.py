"""Checksum verification on the default update path: with every rank on one host the
update is DIRECT (workers read the ranks' pools in place, nothing is staged), and verify=1
must still catch a byte that changed in a pool after registration. The staged path has its
own test (test_update_failures.py: test_corrupted_pool_is_detected_when_staged)."""
import os

import pytest

from mpijob import (WORKER, Deployment, InteractiveServe, corrupt_pool_byte, gen,
                    largest_tensor_needle, wait_log)

pytestmark = pytest.mark.skipif(not os.path.exists(WORKER), reason="ckpt-worker not built")


def test_verify_catches_corrupt_pool_on_direct_update(tmp_path):
    model = gen(tmp_path, size="4MiB", layers=2, shards=2)
    name, needle = largest_tensor_needle(model)
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
