"""A torch worker (tests/gpu/torch_worker.py) updated by real engine ranks: through the
device pipeline in host memory (--device sim, any machine with torch) and on a GPU
(--device cuda: device buckets, NCCL, CUDA IPC; skipped where no GPU is visible)."""
import json
import os
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch", reason="torch is not importable")

from mpijob import MPI_ENV, ENGINE, Deployment, gen, read_checkpoint  # noqa: E402

WORKER_PY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "torch_worker.py")
HAVE_GPU = torch.cuda.is_available()
needs_gpu = pytest.mark.skipif(not HAVE_GPU, reason="no GPU visible (torch.cuda.is_available() "
                               "is False): the CUDA path runs on a GPU machine, scripts/gpu-check")


def run(tmp_path, nranks, device, worker_device, size="8MiB", updates=2, commands=None,
        trace=None):
    model = gen(tmp_path, size=size, layers=2, shards=2)
    dep = Deployment(tmp_path, nranks, serve_args=["--device", device])
    workers = []
    for r in range(nranks):
        log = open(os.path.join(str(tmp_path), "torch-%d.log" % r), "w")
        workers.append(subprocess.Popen(
            [sys.executable, WORKER_PY, "--socket", os.path.join(dep.sock, "rank-%d.sock" % r),
             "--layout", model, "--device", worker_device, "--updates", str(updates),
             "--verify", "--timeout-ms", "60000"], stdout=log, stderr=subprocess.STDOUT,
            env=dict(MPI_ENV)))
    cmds = commands or (["register m %s" % model] +
                        ["update m bucket=2MiB verify=0%s" % (" trace=%s" % trace if trace else "")] *
                        updates)
    try:
        p, res = dep.serve(cmds, check=True, timeout=300)
        for w in workers:
            w.wait(timeout=120)
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
    lines = []
    for r in range(nranks):
        with open(os.path.join(str(tmp_path), "torch-%d.log" % r)) as f:
            text = f.read()
        assert workers[r].returncode == 0, text
        lines.append([json.loads(l) for l in text.splitlines() if l.startswith("{")])
    return model, [x for x in res if x["command"] == "update"], lines


def test_torch_worker_through_the_sim_device(tmp_path):
    """The device pipeline in host memory with torch tensors on the CPU: every update
    completes and the tensors hold exactly the checkpoint (torch_worker compares bytes)."""
    model, ups, lines = run(tmp_path, 2, "sim", "cpu")
    total = sum(len(d) for _, _, d in read_checkpoint(model).values())
    for upd in ups:
        assert upd["ok"] and upd["device"] == "sim" and upd["stage_bytes"] == total, upd
    for worker in lines:
        assert [l["completed"] and l["verified"] for l in worker] == [True, True], worker


@needs_gpu
def test_torch_worker_on_the_gpu(tmp_path):
    """One rank on the GPU, a torch worker holding its tensors on the same GPU: device
    buckets, H2D from the pinned pools, CUDA IPC; the tensors equal the files."""
    model, ups, lines = run(tmp_path, 1, "cuda", "cuda", size="256MiB")
    total = sum(len(d) for _, _, d in read_checkpoint(model).values())
    for upd in ups:
        assert upd["ok"] and upd["device"] == "cuda", upd
        assert upd["stage_bytes"] == total and upd["stage_s"] > 0, upd
    assert [l["completed"] and l["verified"] for l in lines[0]] == [True, True], lines


@needs_gpu
def test_gpu_trace_shows_h2d_overlapping_reload(tmp_path):
    """The next bucket's host-to-device copies run while the worker reloads the current
    one: in the trace, some stage of bucket b+1 starts before the reload of b ends."""
    trace = os.path.join(str(tmp_path), "trace.json")
    model, ups, lines = run(tmp_path, 1, "cuda", "cuda", size="256MiB", updates=1, trace=trace)
    assert overlapping_stages(trace), trace


def overlapping_stages(trace):
    """Buckets b whose reload (the worker copying b) overlaps the stage of b+1."""
    with open(trace) as f:
        events = json.load(f)["traceEvents"]
    spans = {}
    for ev in events:
        if ev.get("ph") == "X":
            spans.setdefault((ev["cat"], ev["args"]["bucket"]), (ev["ts"], ev["ts"] + ev["dur"]))
    return [b for (cat, b) in spans if cat == "reload" and ("stage", b + 1) in spans and
            spans[("stage", b + 1)][0] < spans[("reload", b)][1]]
