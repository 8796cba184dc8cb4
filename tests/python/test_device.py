"""The device path (engine/sink.h) without a GPU: `serve --device sim` runs the pipeline a
GPU runs (per-rank device buffers, the owner's puts, a broadcast to every rank, buffers
handed to workers by handle in BEGIN, not by fd) in host memory, end to end with real ranks
and workers. The CUDA sink itself needs a GPU: tests/gpu and scripts/gpu-check."""
import os
import re

import pytest

import mpijob
from mpijob import (Deployment, InteractiveServe, WORKER, assert_worker_equals, gen,
                    python_worker, read_checkpoint)

pytestmark = pytest.mark.skipif(not os.path.exists(WORKER), reason="ckpt-worker not built")


def checkpoint_bytes(model):
    return sum(len(d) for _, _, d in read_checkpoint(model).values())


def update_of(res):
    return [r for r in res if r["command"] == "update"][0]


@pytest.mark.parametrize("nranks", [1, 3])
def test_sim_device_update_is_byte_exact(tmp_path, nranks):
    """Every rank's worker holds exactly the checkpoint; the owners put each byte once, and
    the buckets went through the device path (two device buffers, pipelined)."""
    model = gen(tmp_path, size="6MiB", layers=2, shards=3)
    dep = Deployment(tmp_path, nranks, serve_args=["--device", "sim"])
    for r in range(nranks):
        dep.start_worker(r, ["--layout", model, "--verify"], updates=2)
    try:
        p, res = dep.serve(["register m %s" % model, "update m bucket=1MiB",
                            "update m bucket=1MiB verify=0"], check=True)
        dep.wait_workers()
    finally:
        dep.stop()
    ups = [r for r in res if r["command"] == "update"]
    assert len(ups) == 2
    for upd in ups:
        assert upd["ok"], upd
        assert upd["device"] == "sim" and upd["direct"] == 0, upd
        assert upd["buffers"] == 2 and upd["buckets"] >= 4, upd
        assert upd["stage_bytes"] == checkpoint_bytes(model), upd
    for r in range(nranks):
        assert_worker_equals(dep, r, model)


def test_sim_device_hands_buffers_by_handle(tmp_path):
    """A Python worker sees views in (simulated) device memory: the BEGIN carried handles,
    and apply_update copies them into its arrays byte for byte."""
    model = gen(tmp_path, size="2MiB", layers=1, shards=1)
    dep = Deployment(tmp_path, 1, serve_args=["--device", "sim"])
    worker = python_worker(tmp_path, r'''
import sys
sys.path[:0] = sys.argv[1:3]
import numpy as np
from ckpt_engine import Receiver
from mpijob import read_checkpoint
want = read_checkpoint(sys.argv[4])
params = {n: np.zeros(len(d), np.uint8) for n, (_, _, d) in want.items()}
memories = set()
with Receiver.connect(sys.argv[3], 60000) as rx:
    orig = rx.next
    def spy(*a, **k):
        kind, b, views = orig(*a, **k)
        memories.update(v.memory for v in views)
        return kind, b, views
    rx.next = spy
    res = rx.apply_update(params)
assert res.completed, res
assert memories == {"sim"}, memories
for n, (_, _, d) in want.items():
    assert params[n].tobytes() == d, n
print("WORKER OK", len(params))
''', os.path.join(dep.sock, "rank-0.sock"), model)
    try:
        p, res = dep.serve(["register m %s" % model, "update m bucket=1MiB"], check=True)
        out, err = worker.communicate(timeout=60)
    finally:
        worker.kill()
    assert update_of(res)["ok"], res
    assert worker.returncode == 0 and "WORKER OK" in out, out + err


def test_sim_device_p2p_joiners(tmp_path, monkeypatch):
    """P2P on the device path: joiners pull into host buffers, put each bucket on the
    device and broadcast it; their workers hold the checkpoint exactly."""
    monkeypatch.setattr(mpijob, "MPI_ENV", dict(mpijob.MPI_ENV, UCX_TLS="shm,self"))
    model = gen(tmp_path, size="6MiB", layers=2, shards=2)
    sdir, jdir = tmp_path / "serving", tmp_path / "joining"
    sdir.mkdir()
    jdir.mkdir()
    sdep = Deployment(sdir, 2)
    srv = InteractiveServe(sdep)
    jdep = Deployment(jdir, 2, serve_args=["--device", "sim"])
    try:
        assert srv.command("register m %s" % model)["ok"]
        metas = str(tmp_path / "metas.json")
        assert srv.command("export m %s" % metas)["ok"]
        for r in range(2):
            jdep.start_worker(r, ["--layout", model, "--verify"], updates=1)
        p, res = jdep.serve(["p2p-update %s bucket=1MiB verify=1" % metas], check=True)
        jdep.wait_workers()
    finally:
        srv.close()
        sdep.stop()
        jdep.stop()
    upd = update_of(res)
    assert upd["ok"] and upd["p2p"] == 1 and upd["device"] == "sim", upd
    # Each bucket goes onto the device in one put, alignment gaps included.
    assert upd["pull_bytes"] == checkpoint_bytes(model) <= upd["stage_bytes"], upd
    for r in range(2):
        assert_worker_equals(jdep, r, model)


def test_device_cuda_without_gpu_names_the_cause(tmp_path):
    """--device cuda insists: on a machine with no GPU (or no runtime) serve fails at start
    and says why; --device auto falls back to the host path and says so."""
    if os.path.exists("/dev/nvidia0"):
        pytest.skip("a GPU is visible: tests/gpu covers --device cuda")
    dep = Deployment(tmp_path, 1, serve_args=["--device", "cuda"])
    p, res = dep.serve(["quit"], timeout=60)
    assert p.returncode != 0
    err = p.stdout + p.stderr
    assert "--device cuda" in err, err
    assert re.search(r"no GPU is visible|no CUDA runtime|cudaGetDeviceCount", err), err
    model = gen(tmp_path, size="2MiB", layers=1, shards=1)
    auto = Deployment(tmp_path / "auto", 1, serve_args=["--device", "auto"])
    auto.start_worker(0, ["--layout", model], updates=1)
    try:
        p, res = auto.serve(["register m %s" % model, "update m"], check=True)
        auto.wait_workers()
    finally:
        auto.stop()
    assert update_of(res)["device"] == "host", res
    assert re.search(r"device: host memory \(device auto: .*(GPU|CUDA)", p.stdout), p.stdout


def test_sim_device_memory_short_is_refused(tmp_path):
    """Device buffers sized from the device's memory: a limit below the largest tensor is
    refused before any byte moves, naming the sizes, as on the host path; the worker's
    model stays as it was."""
    model = gen(tmp_path, size="4MiB", layers=1, shards=1)
    dep = Deployment(tmp_path, 1, serve_args=["--device", "sim", "--memory-limit", "64KiB"])
    dep.start_worker(0, ["--layout", model], updates=1)
    try:
        p, res = dep.serve(["register m %s" % model, "update m timeout=5000"], timeout=90)
    finally:
        dep.stop()
    upd = update_of(res)
    assert not upd["ok"], upd
    assert re.search(r"largest tensor|memory", upd["reason"]), upd


def test_sim_device_trace_shows_the_next_stage_during_the_broadcast(tmp_path):
    """Two device buffers: the owner puts bucket b+1 while bucket b is broadcast and the
    worker reloads it (in the trace, the stage of b+1 begins before the broadcast of b and
    the reload of b end)."""
    import json
    model = gen(tmp_path, size="8MiB", layers=2, shards=1)
    trace = os.path.join(str(tmp_path), "trace.json")
    dep = Deployment(tmp_path, 1, serve_args=["--device", "sim"])
    dep.start_worker(0, ["--layout", model, "--verify"], updates=1)
    try:
        p, res = dep.serve(["register m %s" % model, "update m bucket=1MiB trace=%s" % trace],
                           check=True)
        dep.wait_workers()
    finally:
        dep.stop()
    assert update_of(res)["buckets"] >= 4
    with open(trace) as f:
        events = json.load(f)["traceEvents"]
    spans = {}
    for ev in events:
        if ev.get("ph") == "X":
            spans.setdefault((ev["cat"], ev["args"]["bucket"]), (ev["ts"], ev["ts"] + ev["dur"]))
    overlaps = [b for (cat, b) in spans if cat == "reload" and ("stage", b + 1) in spans and
                spans[("stage", b + 1)][0] < min(spans[("reload", b)][1], spans[("broadcast", b)][1])]
    assert len(overlaps) >= 2, sorted(spans.items())
    assert_worker_equals(dep, 0, model)


def fake_cuda_env():
    """CKPT_CUDART / CKPT_NCCL pointing at the CPU stand-ins (tests/fakecuda), built beside
    the tests wherever the CUDA sink is built (the toolkit's headers present, as in CI)."""
    tests = os.path.join(mpijob.BUILD, "tests")
    libs = [os.path.join(tests, "libfake_cudart.so"), os.path.join(tests, "libfake_nccl.so")]
    for lib in libs:
        assert os.path.exists(lib), "%s not built (configure with the CUDA toolkit)" % lib
    return {"CKPT_CUDART": libs[0], "CKPT_NCCL": libs[1]}


def test_cuda_sink_through_a_cpu_stand_in_runtime(tmp_path, monkeypatch):
    """The CUDA sink's own code (device buffers by cudaMalloc, IPC handles, H2D puts on a
    stream, the broadcast after an event, event timing) and the receiver's CUDA path
    (cudaIpcOpenMemHandle, copies and verify through the runtime), run against a CPU
    stand-in of the CUDA runtime and NCCL with one rank: the worker holds the checkpoint
    exactly, and the result reports the device and the H2D bytes and time."""
    env = fake_cuda_env()
    monkeypatch.setattr(mpijob, "MPI_ENV", dict(mpijob.MPI_ENV, **env))
    for k, v in env.items():  # the worker's receiver opens the handles through them too
        monkeypatch.setenv(k, v)
    model = gen(tmp_path, size="6MiB", layers=2, shards=2)
    dep = Deployment(tmp_path, 1, serve_args=["--device", "cuda"])
    dep.start_worker(0, ["--layout", model, "--verify"], updates=2)
    try:
        p, res = dep.serve(["register m %s" % model, "update m bucket=1MiB",
                            "update m bucket=1MiB verify=0"], check=True)
        dep.wait_workers()
    finally:
        dep.stop()
    assert re.search(r"device: cuda: GPU 0 of 1, NCCL 99999", p.stdout), p.stdout
    for upd in [r for r in res if r["command"] == "update"]:
        assert upd["ok"] and upd["device"] == "cuda", upd
        assert upd["stage_bytes"] == checkpoint_bytes(model) and upd["stage_s"] > 0, upd
    assert_worker_equals(dep, 0, model)


def test_cuda_sink_p2p_joiner_through_a_cpu_stand_in_runtime(tmp_path, monkeypatch):
    """P2P on the CUDA sink (stand-in runtime, one joining rank): pulls land in host
    buffers, each bucket goes onto the device in one put (into device memory: the stand-in
    refuses a host-to-device copy anywhere else) and out through the IPC handle."""
    env = fake_cuda_env()
    monkeypatch.setattr(mpijob, "MPI_ENV", dict(mpijob.MPI_ENV, UCX_TLS="shm,self", **env))
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    model = gen(tmp_path, size="4MiB", layers=2, shards=1)
    sdir, jdir = tmp_path / "serving", tmp_path / "joining"
    sdir.mkdir()
    jdir.mkdir()
    sdep = Deployment(sdir, 1)
    srv = InteractiveServe(sdep, ["--device", "cpu"])
    jdep = Deployment(jdir, 1, serve_args=["--device", "cuda"])
    try:
        assert srv.command("register m %s" % model)["ok"]
        metas = str(tmp_path / "metas.json")
        assert srv.command("export m %s" % metas)["ok"]
        jdep.start_worker(0, ["--layout", model, "--verify"], updates=1)
        p, res = jdep.serve(["p2p-update %s bucket=1MiB verify=1" % metas], check=True)
        jdep.wait_workers()
    finally:
        srv.close()
        sdep.stop()
        jdep.stop()
    upd = update_of(res)
    assert upd["ok"] and upd["p2p"] == 1 and upd["device"] == "cuda", upd
    assert upd["pull_bytes"] == checkpoint_bytes(model) <= upd["stage_bytes"], upd
    assert_worker_equals(jdep, 0, model)
