"""Broadcast update end to end: real ranks under mpirun, real ckpt-worker processes."""
import json
import os
import signal
import subprocess
import time

import pytest

from mpijob import (assert_worker_equals, ENGINE, MPI_ENV, WORKER, Deployment, gen, read_checkpoint,
                    read_safetensors)

pytestmark = pytest.mark.skipif(not os.path.exists(WORKER), reason="ckpt-worker not built")




def one_update(tmp_path, nranks, model, update_opts="", worker_extra=None, serve_args=None):
    dep = Deployment(tmp_path, nranks, serve_args=serve_args)
    for r in range(nranks):
        dep.start_worker(r, ["--layout", model, "--verify"] + (worker_extra or []), updates=1)
    try:
        p, res = dep.serve(["register m %s" % model, "update m %s" % update_opts], check=True)
        dep.wait_workers()
    finally:
        dep.stop()
    return dep, res


@pytest.mark.parametrize("direct", [0, 1])
@pytest.mark.parametrize("nranks", [1, 2, 3, 4])
def test_update_every_rank_count(tmp_path, nranks, direct):
    model = gen(tmp_path, size="6MiB", layers=2, shards=3)
    dep, res = one_update(tmp_path, nranks, model, "bucket=1MiB direct=%d" % direct)
    upd = [r for r in res if r["command"] == "update"][0]
    assert upd["ok"], upd
    assert upd["ranks"] == nranks and upd["buckets"] >= 2
    assert upd["direct"] == direct  # all ranks share this host
    for r in range(nranks):
        assert_worker_equals(dep, r, model)


def largest_aligned(model):
    tensors = read_checkpoint(model)
    return max((len(d) + 255) // 256 * 256 for _, _, d in tensors.values())


@pytest.mark.parametrize("direct", [0, 1])
@pytest.mark.parametrize("which", ["largest", "largest+256", "64MiB"])
def test_bucket_sizes(tmp_path, which, direct):
    model = gen(tmp_path, size="4MiB", layers=2, shards=1)
    largest = largest_aligned(model)
    bucket = {"largest": str(largest), "largest+256": str(largest + 256), "64MiB": "64MiB"}[which]
    dep, res = one_update(tmp_path, 2, model, "bucket=%s direct=%d" % (bucket, direct))
    upd = [r for r in res if r["command"] == "update"][0]
    assert upd["ok"], upd
    # A staged update plans with at most total / 16 per bucket, never below 32 MiB
    # (src/plan/bucket.h): a 4 MiB checkpoint asked for 64 MiB buckets gets 32 MiB.
    want = int(bucket) if bucket.isdigit() else (64 << 20 if direct else 32 << 20)
    assert upd["bucket_size"] == want
    for r in range(2):
        assert_worker_equals(dep, r, model)


def test_share_rank_mode_uses_mpi_broadcast(tmp_path):
    """One pair of IPC buffers per rank: data crosses ranks through MPI."""
    model = gen(tmp_path, size="4MiB", layers=2, shards=2)
    dep, res = one_update(tmp_path, 3, model, "bucket=512KiB", serve_args=["--share", "rank"])
    assert [r for r in res if r["command"] == "update"][0]["ok"]
    for r in range(3):
        assert_worker_equals(dep, r, model)


def test_bucket_smaller_than_largest_tensor_is_refused(tmp_path):
    model = gen(tmp_path, size="4MiB", layers=2, shards=1)
    largest = largest_aligned(model)
    dep = Deployment(tmp_path, 2)
    for r in range(2):
        dep.start_worker(r, ["--layout", model])
    try:
        # The planner raises the bucket to the largest tensor rather than failing...
        p, res = dep.serve(["register m %s" % model, "update m direct=0 bucket=%d" % (largest // 2)])
        upd = [r for r in res if r["command"] == "update"][0]
        assert upd["ok"] and upd["bucket_size"] == largest
        # ...but memory that cannot hold the largest tensor is a clear error before anything moves.
        dep.serve_args = ["--memory-limit", str(largest // 2), "--direct", "off"]
        p, res = dep.serve(["register m %s" % model, "update m"])
        upd = [r for r in res if r["command"] == "update"][0]
        assert not upd["ok"] and "largest tensor" in upd["reason"]
    finally:
        dep.stop()


def test_tensor_parallel_workers(tmp_path):
    model = gen(tmp_path, size="4MiB", layers=2, shards=2)
    dep = Deployment(tmp_path, 2)
    for r in range(2):
        dep.start_worker(r, ["--layout", model, "--verify", "--tp-rank", str(r), "--tp-size", "2"],
                         updates=1)
    try:
        dep.serve(["register m %s" % model, "update m bucket=1MiB"], check=True)
        dep.wait_workers()
    finally:
        dep.stop()
    want = read_checkpoint(model)
    for r in range(2):
        got = read_checkpoint(dep.worker_dump(r))
        sharded = 0
        for name, (dt, shape, data) in want.items():
            gdt, gshape, gdata = got[name]
            if len(shape) >= 2 and shape[0] % 2 == 0:
                rows = shape[0] // 2
                row_bytes = len(data) // shape[0]
                assert gshape == (rows,) + shape[1:], name
                assert gdata == data[r * rows * row_bytes:(r + 1) * rows * row_bytes], name
                sharded += 1
            else:
                assert gdata == data, name
        assert sharded > 0


def test_every_dtype(tmp_path):
    """A checkpoint holding every safetensors dtype, written by hand (raw bytes)."""
    import struct
    dtypes = {"BOOL": 1, "U8": 1, "I8": 1, "U16": 2, "I16": 2, "F16": 2, "BF16": 2, "U32": 4,
              "I32": 4, "F32": 4, "U64": 8, "I64": 8, "F64": 8, "F8_E4M3": 1, "F8_E5M2": 1}
    header, blobs, off = {}, [], 0
    for i, (dt, size) in enumerate(sorted(dtypes.items())):
        shape = [3, 5 + i]
        n = 3 * (5 + i) * size
        blob = bytes((j * 7 + i) % 256 for j in range(n))
        if dt == "BOOL":
            blob = bytes(b & 1 for b in blob)
        header["t_" + dt.lower()] = {"dtype": dt, "shape": shape, "data_offsets": [off, off + n]}
        blobs.append(blob)
        off += n
    hj = json.dumps(header).encode()
    hj += b" " * ((8 - len(hj) % 8) % 8)
    model = os.path.join(str(tmp_path), "dtypes.safetensors")
    with open(model, "wb") as f:
        f.write(struct.pack("<Q", len(hj)) + hj + b"".join(blobs))
    dep, res = one_update(tmp_path, 2, model)
    for r in range(2):
        assert_worker_equals(dep, r, model)


def test_trace_shows_overlap(tmp_path):
    model = gen(tmp_path, size="16MiB", layers=4, shards=2)
    trace = os.path.join(str(tmp_path), "trace.json")
    dep, res = one_update(tmp_path, 2, model, "bucket=1MiB direct=0 trace=" + trace,
                          worker_extra=["--post-hook-sleep-ms", "0"])
    with open(trace) as f:
        events = json.load(f)["traceEvents"]
    spans = [e for e in events if e.get("ph") == "X"]
    assert spans
    reload = {(e["pid"], e["args"]["bucket"]): e for e in spans if e["cat"] == "reload"}
    prep = [e for e in spans if e["cat"] in ("stage", "broadcast", "ready")]
    # Some preparation of bucket b+1 runs while a worker still reloads bucket b.
    overlaps = 0
    for e in prep:
        b = e["args"]["bucket"]
        for pid in range(2):
            r = reload.get((pid, b - 1))
            if r and e["ts"] < r["ts"] + r["dur"] and r["ts"] < e["ts"] + e["dur"]:
                overlaps += 1
    assert overlaps > 0


def test_idle_ranks_do_not_spin(tmp_path):
    fifo = os.path.join(str(tmp_path), "cmds")
    os.mkfifo(fifo)
    args = ["mpirun", "-np", "2", "--bind-to", "none", ENGINE, "serve", "--commands", fifo]
    p = subprocess.Popen(args, env=MPI_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    w = open(fifo, "w")
    try:
        time.sleep(1.5)
        pids = subprocess.run(["pgrep", "-f", "ckpt-engine serve --commands " + fifo],
                              capture_output=True, text=True).stdout.split()
        pids = [int(x) for x in pids if int(x) != p.pid]

        def cpu(pid):
            with open("/proc/%d/stat" % pid) as f:
                parts = f.read().rsplit(")", 1)[1].split()
            return (int(parts[11]) + int(parts[12])) / os.sysconf("SC_CLK_TCK")

        before = {pid: cpu(pid) for pid in pids}
        time.sleep(2.0)
        used = {pid: cpu(pid) - before[pid] for pid in pids}
        assert len(pids) >= 2, pids
        for pid, s in used.items():
            assert s < 0.5, "rank process %d used %.2f s of CPU in 2 s while idle" % (pid, s)
    finally:
        w.write("quit\n")
        w.close()
        p.wait(timeout=30)
