"""Workers declare what they need (NEED, protocol version 4; ckpt_receiver_declare_need):
the engine checks the declarations against the update before any byte moves, sends each
worker only the records of the tensors it needs, and counts the bytes every worker needs.
Real ranks under mpirun, real ckpt-worker processes (and a Python worker for the errors)."""
import json
import os
import textwrap

import pytest

from mpijob import (WORKER, Deployment, InteractiveServe, assert_worker_equals, gen,
                    python_worker, read_checkpoint, wait_log)


pytestmark = pytest.mark.skipif(not os.path.exists(WORKER), reason="ckpt-worker not built")

DECLARED = r"declared the need of (\d+) tensors"


def start(tmp_path, nranks, worker_args, serve_args=()):
    """A serve job and one ckpt-worker per rank; returns once every worker declared.
    serve_args ["--share", "rank"]: every rank its own group, as hosts are."""
    dep = Deployment(tmp_path, nranks)
    srv = InteractiveServe(dep, extra_args=list(serve_args))
    for r in range(nranks):
        dep.start_worker(r, worker_args(r))
    for r in range(nranks):
        wait_log(dep, r, DECLARED)
    return dep, srv


def wait_complete(dep, n):
    for r in range(n):
        wait_log(dep, r, r"update \d+ of 'm' version \d+: complete")


def assert_each_holds_its_layer(dep, layer):
    """Worker r's dump is exactly layer r's tensors, byte for byte."""
    for r, mine in enumerate(layer):
        got = read_checkpoint(dep.worker_dump(r))
        assert set(got) == set(mine), r
        for name, (dt, shape, data) in mine.items():
            assert got[name][2] == data, (r, name)


def tp_need(want, r, tp):
    """Bytes ckpt-worker --tp-rank r --tp-size tp holds: rows of dim 0 where it divides."""
    total = 0
    for dt, shape, data in want.values():
        total += len(data) // tp if len(shape) >= 2 and shape[0] % tp == 0 else len(data)
    return total


@pytest.mark.parametrize("direct", [0, 1])
def test_tensor_parallel_workers_declare_their_rows(tmp_path, direct):
    model = gen(tmp_path, size="4MiB", layers=2, shards=2)
    want = read_checkpoint(model)
    dep, srv = start(tmp_path, 2, lambda r: ["--layout", model, "--verify", "--tp-rank", str(r),
                                             "--tp-size", "2", "--declare-need"])
    try:
        assert srv.command("register m %s" % model)["ok"]
        res = srv.command("update m bucket=1MiB direct=%d" % direct)
        assert res["ok"], res
        total = sum(len(d) for _, _, d in want.values())
        needs = [tp_need(want, r, 2) for r in range(2)]
        assert res["need_bytes_total"] == sum(needs) < 2 * total
        assert res["need_bytes_max"] == max(needs) and res["unneeded"] == 0
        wait_complete(dep, 2)
    finally:
        srv.close()
        dep.stop()
    assert_each_holds_its_rows(dep, want, 2)  # verified by the workers too


def assert_each_holds_its_rows(dep, want, tp):
    for r in range(tp):
        got = read_checkpoint(dep.worker_dump(r))
        for name, (dt, shape, data) in want.items():
            if len(shape) >= 2 and shape[0] % tp == 0:
                n = len(data) // tp
                assert got[name][2] == data[r * n:(r + 1) * n], (r, name)
            else:
                assert got[name][2] == data, (r, name)


def test_tensors_cut_by_the_rows_each_group_needs(tmp_path):
    """--share rank: every rank its own group, as hosts are. TP=2 workers declare their rows;
    the engine cuts each sharded tensor so a group receives only its rows of what the other
    owns: about half the bytes of the same update with verify=1 (which sends whole tensors,
    the checksums cover whole tensors), and each worker holds exactly its rows."""
    model = gen(tmp_path, size="4MiB", layers=2, shards=2)
    want = read_checkpoint(model)
    dep, srv = start(tmp_path, 2, lambda r: ["--layout", model, "--tp-rank", str(r),
                                             "--tp-size", "2", "--declare-need"],
                     ["--share", "rank"])
    try:
        assert srv.command("register m %s" % model)["ok"]
        whole = srv.command("update m bucket=1MiB verify=1")
        assert whole["ok"], whole["reason"]
        wait_complete(dep, 2)
        cut = srv.command("update m bucket=1MiB")
        assert cut["ok"], cut["reason"]
        for r in range(2):
            wait_log(dep, r, r"update %d of 'm' version \d+: complete" % cut["update_id"])
        total = sum(len(d) for _, _, d in want.values())
        assert whole["host_bytes_max"] > total / 3, whole
        assert 0 < cut["host_bytes_max"] < 0.6 * whole["host_bytes_max"], (cut, whole)
        assert cut["bytes"] == whole["bytes"] == total  # every row is someone's
    finally:
        srv.close()
        dep.stop()
    assert_each_holds_its_rows(dep, want, 2)


SHARD_WORKER = textwrap.dedent("""
    import json, sys
    import numpy as np
    sys.path[:0] = [sys.argv[1], sys.argv[2]]
    from ckpt_engine import Receiver, layout_needs
    from ckpt_engine.receiver import _NUMPY
    from mpijob import read_checkpoint
    want = read_checkpoint(sys.argv[4])
    model = {n: (dt, shape) for n, (dt, shape, _) in want.items()}
    needs = layout_needs(model, tp=2, rank=int(sys.argv[5]))
    shards = {}
    for n, need in needs.items():
        dt, shape = model[n]
        shape = list(shape)
        if need:
            shape[need[0]] = need[2]
        shards[n] = np.zeros(shape, dtype=_NUMPY[dt])
    with Receiver.connect(sys.argv[3], timeout_ms=30000) as rx:
        rx.declare_need(needs)
        print("declared", flush=True)
        for update in range(2):
            rx.wait_update(60000)
            parts = cols = 0
            while True:
                kind, bucket, views = rx.next()
                if kind != "bucket":
                    break
                for v in views:
                    need = needs[v.name]
                    parts += v.part is not None
                    cols += v.part is not None and v.part[0] == 1
                    if need is None:
                        v.copy_to(shards[v.name].reshape(-1).view(np.uint8))
                    else:
                        v.copy_slice(shards[v.name], need[0], need[1])
                rx.ack()
            rx.finish_reply(True)
            differ = 0
            for n, need in needs.items():
                dt, shape, data = want[n]
                full = np.frombuffer(data, dtype=_NUMPY[dt]).reshape(shape)
                if need:
                    full = np.take(full, range(need[1], need[1] + need[2]), axis=need[0])
                differ += full.tobytes() != shards[n].tobytes()
            print("update", update, "parts", parts, "cols", cols, "differ", differ, flush=True)
""")


@pytest.mark.skipif(os.environ.get("CKPT_SANITIZE") == "ON",
                    reason="ctypes cannot load an ASan libckpt.so")
def test_rows_and_columns_cut_for_python_shards(tmp_path):
    """--share rank; Python workers hold only their vLLM-style TP=2 shards (rows of q/k/v,
    gate/up; columns of o/down) and copy each view with copy_slice. With verify=1 every
    tensor comes whole; without, sharded tensors come as parts (columns packed by the
    owner), the busiest group receives less, and every shard equals the checkpoint's."""
    model = gen(tmp_path, size="2MiB", layers=2, shards=2)
    dep = Deployment(tmp_path, 2)
    srv = InteractiveServe(dep, extra_args=["--share", "rank"])
    py = [python_worker(tmp_path, SHARD_WORKER, os.path.join(dep.sock, "rank-%d.sock" % r),
                        model, r, name="shard%d.py" % r) for r in range(2)]
    try:
        for p in py:
            assert p.stdout.readline().strip() == "declared"
        assert srv.command("register m %s" % model)["ok"]
        whole = srv.command("update m bucket=1MiB verify=1")
        assert whole["ok"], whole["reason"]
        for p in py:
            assert p.stdout.readline().split() == ["update", "0", "parts", "0", "cols", "0",
                                                   "differ", "0"]
        cut = srv.command("update m bucket=1MiB")
        assert cut["ok"], cut["reason"]
        for p in py:
            line = p.stdout.readline().split()
            assert line[:2] == ["update", "1"] and line[6:] == ["differ", "0"], line
            assert int(line[3]) > int(line[5]) > 0, line  # rows and columns cut
        assert 0 < cut["host_bytes_max"] < 0.75 * whole["host_bytes_max"], (cut, whole)
    finally:
        srv.close()
        for p in py:
            p.kill()
            p.communicate(timeout=30)


def test_a_tensor_nobody_needs_fails_before_any_byte_moves(tmp_path):
    """Worker 0 holds layer 0, worker 1 layer 1: the embedding, norms and head are needed by
    nobody. The update fails naming them, before BEGIN; with unneeded=ignore it leaves them
    out and each worker receives only its layer (a record of the other layer would fail its
    bucket: ckpt-worker's layout does not have it)."""
    model = gen(tmp_path, size="4MiB", layers=2, shards=2)
    want = read_checkpoint(model)
    dep, srv = start(tmp_path, 2, lambda r: ["--layout", model, "--verify",
                                             "--need-glob", "*layers.%d.*" % r])
    layer = [{n: v for n, v in want.items() if "layers.%d." % r in n} for r in range(2)]
    unneeded = [n for n in want if "layers." not in n]
    assert unneeded and layer[0] and layer[1]
    try:
        assert srv.command("register m %s" % model)["ok"]
        for direct in (0, 1):
            res = srv.command("update m direct=%d" % direct)
            assert not res["ok"], res
            assert res["status"] == "CKPT_EINVAL" and res["buckets"] == 0
            assert "%d of %d tensors are needed by no worker" % (len(unneeded), len(want)) \
                in res["reason"], res
            assert "'%s'" % sorted(unneeded)[0] in res["reason"] or "..." in res["reason"]
            assert "unneeded=ignore" in res["reason"]
        for r in range(2):  # nothing reached the workers: no BEGIN, no update line
            assert "update " not in dep.worker_log(r).replace("update refused", "")
        for direct in (0, 1):
            res = srv.command("update m unneeded=ignore verify=1 direct=%d" % direct)
            assert res["ok"], res["reason"]
            assert res["unneeded"] == len(unneeded)
            assert res["tensors"] == len(want) - len(unneeded)
            assert res["need_bytes_max"] == max(sum(len(d) for _, _, d in layer[r].values())
                                                for r in range(2))
        wait_complete(dep, 2)
    finally:
        srv.close()
        dep.stop()
    assert_each_holds_its_layer(dep, layer)


def test_routed_between_rank_groups(tmp_path):
    """--share rank: every rank its own group, as hosts are, so buckets are routed by need
    between the groups (point-to-point over MPI on this host): worker r holds layer r only,
    the busiest group receives at most one layer, every worker verified."""
    model = gen(tmp_path, size="4MiB", layers=2, shards=2)
    want = read_checkpoint(model)
    layer = [{n: v for n, v in want.items() if "layers.%d." % r in n} for r in range(2)]
    dep, srv = start(tmp_path, 2, lambda r: ["--layout", model, "--verify",
                                             "--need-glob", "*layers.%d.*" % r],
                     ["--share", "rank"])
    try:
        assert srv.command("register m %s" % model)["ok"]
        res = srv.command("update m bucket=1MiB unneeded=ignore verify=1")
        assert res["ok"], res["reason"]
        full = sum(len(d) for _, _, d in want.values())
        assert 0 < res["host_bytes_max"] <= max(sum(len(d) for _, _, d in l.values())
                                                for l in layer) + 4096 * res["tensors"]
        assert res["host_bytes_max"] < full / 2
        wait_complete(dep, 2)
    finally:
        srv.close()
        dep.stop()
    assert_each_holds_its_layer(dep, layer)


def test_an_undeclared_worker_needs_everything(tmp_path):
    """One worker declares layer 0 only, the other declares nothing: every tensor is needed
    (by the second), the update is whole for it and filtered for the first."""
    model = gen(tmp_path, size="4MiB", layers=2, shards=2)
    want = read_checkpoint(model)
    dep = Deployment(tmp_path, 2)
    srv = InteractiveServe(dep)
    dep.start_worker(0, ["--layout", model, "--verify", "--need-glob", "*layers.0.*"])
    dep.start_worker(1, ["--layout", model, "--verify"])
    wait_log(dep, 0, DECLARED)
    try:
        assert srv.command("register m %s" % model)["ok"]
        res = srv.command("update m direct=0 bucket=1MiB")
        assert res["ok"], res
        total = sum(len(d) for _, _, d in want.values())
        mine = sum(len(d) for n, (_, _, d) in want.items() if "layers.0." in n)
        assert res["need_bytes_total"] == total + mine and res["need_bytes_max"] == total
        wait_complete(dep, 2)
    finally:
        srv.close()
        dep.stop()
    assert_worker_equals(dep, 1, model)


PY_WORKER = textwrap.dedent("""
    import sys
    sys.path[:0] = [sys.argv[1]]
    from ckpt_engine import CkptError, Receiver
    with Receiver.connect(sys.argv[3], timeout_ms=30000) as rx:
        try:
            rx.declare_need({"a": None, "b": (9, 0, 1)})
        except CkptError as e:
            print("local:", e, flush=True)
        rx.declare_need({sys.argv[4]: None if sys.argv[5] == "-" else (0, 0, int(sys.argv[5]))})
        print("declared", flush=True)
        try:
            rx.wait_update(timeout_ms=20000)
        except CkptError as e:
            print("no update:", e, flush=True)
""")


@pytest.mark.skipif(os.environ.get("CKPT_SANITIZE") == "ON",
                    reason="ctypes cannot load an ASan libckpt.so")
@pytest.mark.parametrize("name, rows, fragment", [
    ("no.such.tensor", "-", "needs tensor 'no.such.tensor', which the update does not have"),
    ("model.norm.weight", "1000000", "needs [0, 1000000) of dimension 0 of tensor 'model.norm.weight'"),
])
def test_a_need_that_does_not_fit_is_refused_naming_it(tmp_path, name, rows, fragment):
    model = gen(tmp_path, size="1MiB", layers=1, shards=1)
    dep = Deployment(tmp_path, 1)
    srv = InteractiveServe(dep)
    py = python_worker(tmp_path, PY_WORKER, os.path.join(dep.sock, "rank-0.sock"), name, rows)
    try:
        line = py.stdout.readline()
        assert line.startswith("local:") and "dimension 9" in line, line
        assert py.stdout.readline().strip() == "declared"
        assert srv.command("register m %s" % model)["ok"]
        res = srv.command("update m")
        assert not res["ok"] and res["failed_rank"] == 0, res
        assert fragment in res["reason"] and "rank 0: its worker (pid %d)" % py.pid in res["reason"]
        assert res["buckets"] == 0
    finally:
        srv.close()
        out, err = py.communicate(timeout=60)
    assert "no update" in out, out + err  # BEGIN never came


LAYOUT_WORKER = textwrap.dedent("""
    import json, sys
    import numpy as np
    sys.path[:0] = [sys.argv[1], sys.argv[2]]
    from ckpt_engine import Receiver, layout_needs
    from mpijob import read_checkpoint
    want = read_checkpoint(sys.argv[4])
    model = {n: (dt, shape) for n, (dt, shape, _) in want.items()}
    needs = layout_needs(model, tp=2, rank=int(sys.argv[5]))
    print(json.dumps(needs), flush=True)
    params = {n: np.zeros(len(want[n][2]), dtype=np.uint8) for n in needs}
    with Receiver.connect(sys.argv[3], timeout_ms=30000) as rx:
        rx.declare_need(needs)
        print("declared", flush=True)
        res = rx.apply_update(params, verify=True)
        print("result", res.completed, flush=True)
        print("differ", sum(params[n].tobytes() != want[n][2] for n in needs), flush=True)
""")


@pytest.mark.skipif(os.environ.get("CKPT_SANITIZE") == "ON",
                    reason="ctypes cannot load an ASan libckpt.so")
def test_python_worker_declares_its_tp_shard(tmp_path):
    """layout_needs shards as vLLM does (q/k/v, gate/up by rows; o/down by columns; norms
    whole); a Python worker declares it and the engine counts exactly those bytes."""
    model = gen(tmp_path, size="2MiB", layers=2, shards=1)
    want = read_checkpoint(model)
    dep = Deployment(tmp_path, 1)
    srv = InteractiveServe(dep)
    py = python_worker(tmp_path, LAYOUT_WORKER, os.path.join(dep.sock, "rank-0.sock"), model, 1)
    try:
        needs = json.loads(py.stdout.readline())
        rows = {n for n, p in needs.items() if p and p[0] == 0}
        cols = {n for n, p in needs.items() if p and p[0] == 1}
        assert any("q_proj" in n for n in rows) and any("gate_proj" in n for n in rows)
        assert any("o_proj" in n for n in cols) and any("down_proj" in n for n in cols)
        assert "model.embed_tokens.weight" in rows and "lm_head.weight" in rows
        assert needs["model.norm.weight"] is None
        for n in rows | cols:  # rank 1 of 2: the second half
            dim, start, length = needs[n]
            assert start == length == want[n][1][dim] // 2, (n, needs[n])
        assert py.stdout.readline().strip() == "declared"
        assert srv.command("register m %s" % model)["ok"]
        res = srv.command("update m bucket=1MiB")
        assert res["ok"], res["reason"]
        expect = sum(len(d) if needs[n] is None else len(d) // 2 for n, (_, _, d) in want.items())
        assert res["need_bytes_total"] == res["need_bytes_max"] == expect
        assert expect < res["bytes"]
        assert py.stdout.readline().split() == ["result", "True"]
        assert py.stdout.readline().split() == ["differ", "0"]
    finally:
        srv.close()
        py.kill()
        py.communicate(timeout=30)
