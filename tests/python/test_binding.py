"""The Python binding (python/ckpt_engine, ctypes over libckpt.so) as a real worker: one
rank feeds a Python worker, the other the C reference worker, in the same update."""
import os
import subprocess
import textwrap

import pytest

from mpijob import WORKER, Deployment, InteractiveServe, gen, python_worker, read_checkpoint

SRC = os.environ.get("CKPT_SOURCE_DIR", os.path.join(os.path.dirname(__file__), "..", ".."))
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
    py = python_worker(tmp_path, WORKER_SCRIPT, os.path.join(dep.sock, "rank-0.sock"), model)
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


FOLLOW_SCRIPT = textwrap.dedent("""
    import hashlib, json, sys
    import numpy as np
    sys.path[:0] = [sys.argv[1], sys.argv[2]]
    from ckpt_engine import follow
    from mpijob import read_checkpoint
    params = {n: np.zeros(len(d), dtype=np.uint8)
              for n, (_, _, d) in read_checkpoint(sys.argv[4]).items()}
    for res in follow(sys.argv[3], params):  # check_model: params are the model
        sums = {n: hashlib.sha256(a.tobytes()).hexdigest() for n, a in params.items()}
        print(json.dumps({"completed": res.completed, "reason": res.reason, "sums": sums}),
              flush=True)
""")


def test_python_worker_refuses_a_partial_checkpoint_unless_asked(tmp_path):
    """follow() declares its params as the model (Receiver.set_model): one shard of a
    two-shard checkpoint is refused before a byte lands, naming the missing tensors, and
    the params keep the last complete weights; the same shard with partial=1 lands, and
    only its tensors change."""
    import hashlib
    import json
    import shutil
    full = gen(tmp_path, size="4MiB", layers=2, shards=2, name="a")
    new = os.path.join(str(tmp_path), "b")
    subprocess.run([os.path.join(BUILD, "tools", "ckpt-engine"), "gen", "--out", new,
                    "--size", "4MiB", "--layers", "2", "--shards", "2", "--seed", "7"],
                   check=True, capture_output=True)
    part = os.path.join(str(tmp_path), "part")
    os.makedirs(part)
    shard = sorted(f for f in os.listdir(new) if f.endswith(".safetensors"))[0]
    shutil.copy(os.path.join(new, shard), part)
    dep = Deployment(tmp_path, 1)
    srv = InteractiveServe(dep)
    py = python_worker(tmp_path, FOLLOW_SCRIPT, os.path.join(dep.sock, "rank-0.sock"), full,
                       name="follow.py")

    def next_result():
        line = py.stdout.readline()
        assert line, py.stderr.read()
        return json.loads(line)

    def sha(d):
        return hashlib.sha256(d).hexdigest()

    try:
        assert srv.command("register full %s" % full)["ok"]
        assert srv.command("update full timeout=10000")["ok"]
        first = next_result()
        assert first["completed"], first
        assert srv.command("register part %s" % part)["ok"]
        res = srv.command("update part timeout=10000")
        assert not res["ok"] and "missing from the update" in res["reason"], res
        refused = next_result()
        assert not refused["completed"] and "missing from the update" in refused["reason"]
        assert refused["sums"] == first["sums"], "a refused update changed the params"
        res = srv.command("update part timeout=10000 partial=1")
        assert res["ok"], res
        mixed = next_result()
        assert mixed["completed"], mixed
    finally:
        srv.close()
        dep.stop()
        py.kill()
        py.wait()
    old, shard_new = read_checkpoint(full), read_checkpoint(os.path.join(part, shard))
    for name, (_, _, data) in old.items():
        want = shard_new[name][2] if name in shard_new else data
        assert mixed["sums"][name] == sha(want), name
    assert 0 < len(shard_new) < len(old)
