"""The Python binding (python/ckpt_engine, ctypes over libckpt.so) as a real worker: one
rank feeds a Python worker, the other the C reference worker, in the same update."""
import os
import subprocess
import sys
import textwrap

import pytest

from mpijob import WORKER, Deployment, InteractiveServe, gen, read_checkpoint

SRC = os.environ.get("CKPT_SOURCE_DIR", os.path.join(os.path.dirname(__file__), "..", ".."))
PYDIR = os.path.join(SRC, "python")
BUILD = os.environ.get("CKPT_BUILD_DIR", os.path.join(SRC, "build", "release"))

pytestmark = pytest.mark.skipif(
    os.environ.get("CKPT_SANITIZE") == "ON" or not os.path.exists(WORKER),
    reason="needs the non-sanitizer build (ctypes cannot load an ASan libckpt.so)")

WORKER_SCRIPT = textwrap.dedent("""
    import sys
    import numpy as np
    sys.path[:0] = [sys.argv[1], sys.argv[2]]
    from ckpt_engine import CkptError, Receiver
    from mpijob import read_checkpoint
    want = read_checkpoint(sys.argv[4])
    params = {n: np.zeros(len(d), dtype=np.uint8) for n, (_, _, d) in want.items()}
    with Receiver.connect(sys.argv[3], timeout_ms=30000) as rx:
        res = rx.apply_update(params, verify=True)
        print("result", res.completed, res.name, res.tensors)
        bad = [n for n, (_, _, d) in want.items() if params[n].tobytes() != d]
        print("differ", len(bad))
        # A second update whose bucket names a tensor this worker lacks: it fails cleanly.
        del params[sorted(params)[0]]
        res = rx.apply_update(params, verify=True)
        print("second", res.completed, res.reason)
""")


def test_python_worker_beside_c_worker(tmp_path):
    model = gen(tmp_path, size="4MiB", layers=2, shards=2)
    dep = Deployment(tmp_path, 2)
    srv = InteractiveServe(dep)
    env = dict(os.environ, CKPT_BUILD_DIR=BUILD)
    script = os.path.join(str(tmp_path), "worker.py")
    with open(script, "w") as f:
        f.write(WORKER_SCRIPT)
    py = subprocess.Popen([sys.executable, script, PYDIR, os.path.dirname(__file__),
                           os.path.join(dep.sock, "rank-0.sock"), model],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    dep.start_worker(1, ["--layout", model, "--verify"])
    try:
        assert srv.command("register m %s" % model)["ok"]
        res = srv.command("update m bucket=1MiB verify=1")
        assert res["ok"], res
        res = srv.command("update m bucket=1MiB verify=1")
        assert not res["ok"] and res["failed_rank"] == 0 and "unknown tensor" in res["reason"], res
        out, err = py.communicate(timeout=60)
    finally:
        srv.close()
        dep.stop()
        if py.poll() is None:
            py.kill()
    lines = out.splitlines()
    assert "result True m" in lines[0], out + err
    assert lines[1] == "differ 0", out + err
    assert lines[2].startswith("second False"), out + err
