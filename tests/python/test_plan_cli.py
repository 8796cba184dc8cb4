"""`ckpt-engine plan`: the cost model's command line on the published model descriptions
(bench/models) and on a real checkpoint; bad input is refused with the cause named."""
import json
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODELS = os.path.join(REPO, "bench", "models")

# Totals of the published checkpoints (bench/models/README.md)
PUBLISHED = {
    "kimi-k2.json": (139644, 1029173256720),
    "qwen3-235b-a22b.json": (36945, 470187269120),
    "glm-4.5-air.json": (18329, 220937661440),
}


def plan(run_tool, *args, check=True):
    proc = run_tool("plan", *args, "--json", check=check)
    return json.loads(proc.stdout) if proc.returncode == 0 else proc


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_descriptions_expand_to_the_published_checkpoints(run_tool, name):
    r = plan(run_tool, os.path.join(MODELS, name))
    assert (r["ntensors"], r["total_bytes"]) == PUBLISHED[name]


def test_kimi_k2_on_256_gpus(run_tool):
    """The README's case: 32 hosts x 8 GPUs, TP16. Full broadcast: every host receives every
    byte it does not own; routed: a host holds half of each TP16 instance, so half."""
    total = PUBLISHED["kimi-k2.json"][1]
    r = plan(run_tool, os.path.join(MODELS, "kimi-k2.json"), "--gpu", "--hosts", 32,
             "--ranks-per-host", 8, "--tp", 16, "--bucket-max", "8GiB", "--inter", 400,
             "--intra", 72)
    full, routed = r["full"], r["routed"]
    assert total * 0.96 < full["host_in_max"] < total
    assert total * 0.45 < routed["host_in_max"] < total * 0.5
    # each GPU needs about 1/16 of the model (replicated norms, routers, MLA projections)
    assert total / 16 < routed["worker_max"] < total / 14
    # every GPU receives every byte at 72 GB/s in the full broadcast: that bounds it
    assert full["bound"] == "broadcast" and full["total_s"] > total / 72e9
    assert routed["total_s"] < full["total_s"] / 5


def test_a_real_checkpoint_and_the_text_table(run_tool, tmp_path):
    model = tmp_path / "model"
    run_tool("gen", "--out", model, "--size", "16MiB", "--shards", 2, "--layers", 2)
    r = plan(run_tool, model, "--hosts", 2, "--tp", 2, "--inter", 1)
    files = run_tool("inspect", model, "--json").stdout
    assert r["total_bytes"] == sum(t["nbytes"] for t in json.loads(files)["tensors"])
    assert r["full"]["link_bytes"] == r["total_bytes"]  # each host receives the other's half
    assert r["routed"]["link_bytes"] < r["full"]["link_bytes"]
    text = run_tool("plan", model, "--hosts", 2, "--tp", 2).stdout
    for fragment in ("full broadcast", "need-routed", "predicted update", "bytes each host receives"):
        assert fragment in text


def test_tcp_core_separates_the_link_from_the_cores(run_tool, tmp_path):
    """--cores bounds a host-memory update by core time; a byte crossing hosts costs a core
    1/--tcp-core (default: 1/--inter). On a shaped link (slow --inter, TCP's core cost that
    of the unshaped link) the link bounds the update, not the cores."""
    model = tmp_path / "model"
    run_tool("gen", "--out", model, "--size", "16MiB", "--shards", 2, "--layers", 2)
    base = [model, "--hosts", 2, "--inter", "0.25", "--cores", 1, "--one-machine"]
    same = plan(run_tool, *base)["full"]
    fast = plan(run_tool, *base, "--tcp-core", "2")["full"]
    assert same["bound"] == "cores" and fast["bound"] == "broadcast", (same, fast)
    assert fast["cpu_s"] < same["cpu_s"] / 4 and fast["total_s"] < same["total_s"]
    assert fast["bcast_s"] == same["bcast_s"]  # the link itself is as slow
    proc = run_tool("plan", *base, "--tcp-core", "-1", check=False)
    assert proc.returncode != 0 and "--tcp-core" in proc.stderr


@pytest.mark.parametrize("args, rc, fragment", [
    (["/nonexistent/model"], 1, "/nonexistent/model"),
    (["{models}/kimi-k2.json", "--hosts", "3", "--tp", "2"], 1, "whole instances of tp*pp = 2"),
    (["{models}/kimi-k2.json", "--hosts", "2", "--direct", "on"], 2, "--direct on is for one host"),
    (["{models}/kimi-k2.json", "--tp", "0"], 2, "--tp wants a whole number >= 1"),
    (["{models}/kimi-k2.json", "--hosts", "2", "--inter", "0"], 1, "inter (between hosts)"),
    (["{bad}"], 1, "tensor entry 1 ('w'): unknown dtype 'BF17'"),
    (["{bad_range}"], 1, "tensor entry 0: \"layers\" must be [first, end)"),
])
def test_bad_input_is_named(run_tool, tmp_path, args, rc, fragment):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"tensors": [
        {"name": "v", "shape": [2], "dtype": "F32"},
        {"name": "w", "shape": [2], "dtype": "BF17"}]}))
    bad_range = tmp_path / "range.json"
    bad_range.write_text(json.dumps({"tensors": [
        {"name": "l.{layer}.w", "shape": [2], "dtype": "F32", "layers": [3, 1]}]}))
    args = [a.format(models=MODELS, bad=bad, bad_range=bad_range) for a in args]
    proc = run_tool("plan", *args, check=False)
    assert proc.returncode == rc, proc.stderr
    assert fragment in proc.stderr


def test_help(run_tool):
    out = run_tool("plan", "--help").stdout
    assert "--inter GBPS" in out and "bench/models" in out
