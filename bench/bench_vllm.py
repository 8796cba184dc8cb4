"""What an in-place update through ckpt-engine saves a vLLM user, measured in one run on
one ~1 GiB random Llama (hidden 2048, 8 layers, float32):

  (a) restart: a new vLLM process (default multi-process mode) on the new checkpoint,
      from `python` start to the first generated token;
  (b) vLLM's own in-place reload of the same files from disk
      (`collective_rpc("reload_weights", weights_path=...)`), page cache dropped for the
      files (posix_fadvise DONTNEED) and warm;
  (c) ckpt-engine into its reference worker (`ckpt-worker`), the transfer alone;
  (d) ckpt-engine into vLLM in place (`ckpt_engine.vllm`): engine, transfer and vLLM's own
      loading and packing;
beside the floors of the same run (single-core memcpy of the checkpoint's bytes, a cold
read of its files). Every vLLM row is verified: greedy tokens after it equal those of the
fresh start (a) on the same checkpoint. Figures are medians of --repeat runs, interleaved.

Run it with scripts/bench-vllm (installs vLLM first) or with the vLLM virtualenv's python:
    CKPT_BUILD_DIR=build/release PYTHONPATH=python:tests/python:tests/vllm VENV/bin/python bench/bench_vllm.py
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.dirname(HERE)
sys.path[:0] = [os.path.join(SRC, "python"), os.path.join(SRC, "tests", "python"),
                os.path.join(SRC, "tests", "vllm")]
os.environ.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
os.environ.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")  # vLLM logs to stdout: keep the table clean

from vllm_helpers import PROMPTS  # noqa: E402  (the same prompts as the in-place rows)

RESTART_SCRIPT = r"""
import json, sys, time
t0 = float(sys.argv[2])
from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt
llm = LLM(model=sys.argv[1], dtype="float32", enforce_eager=True, skip_tokenizer_init=True,
          max_model_len=256, max_num_seqs=4, seed=0)
sp = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, detokenize=False)
out = llm.generate([TokensPrompt(prompt_token_ids=p) for p in %r], sp, use_tqdm=False)
ready = time.time() - t0
print("RESULT " + json.dumps({"ready_s": ready, "tokens": [list(o.outputs[0].token_ids) for o in out]}), flush=True)
llm.llm_engine.engine_core.shutdown()
""" % (PROMPTS,)


def log(msg):
    print("bench-vllm: " + msg, file=sys.stderr, flush=True)


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def drop_cache(path):
    for f in sorted(os.listdir(path)):
        fd = os.open(os.path.join(path, f), os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def read_files(path):
    n = 0
    for f in sorted(os.listdir(path)):
        with open(os.path.join(path, f), "rb", buffering=0) as fh:
            while True:
                b = fh.read(64 << 20)
                if not b:
                    break
                n += len(b)
    return n


def ckpt_bytes(path):
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path)
               if f.endswith(".safetensors"))


def memcpy_floor(nbytes):
    import numpy as np
    src = np.ones(nbytes, dtype=np.uint8)
    dst = np.empty_like(src)
    dst[:] = src  # first touch outside the timing
    t = time.perf_counter()
    np.copyto(dst, src)
    return nbytes / (time.perf_counter() - t) / 1e9


def restart(path):
    env = dict(os.environ)
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)  # vLLM's default: separate processes
    t0 = time.time()
    p = subprocess.run([sys.executable, "-c", RESTART_SCRIPT, path, repr(t0)],
                       capture_output=True, text=True, env=env, timeout=900)
    for line in p.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError("restarted vLLM did not answer:\n" + p.stderr[-3000:])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "ckpt-bench-vllm"),
                    help="where the checkpoints are made (reused; default %(default)s)")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=4096)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", help="also write every figure to this file")
    args = ap.parse_args()

    import models
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the in-place rows: one process
    ck = {}
    for which, seed in (("A", 1), ("B", 2)):
        p = os.path.join(args.dir, "llama-%dL-%d-%s" % (args.layers, args.hidden, which))
        if not os.path.exists(os.path.join(p, "config.json")):
            log("making checkpoint %s (random Llama, %d layers, hidden %d)" % (
                p, args.layers, args.hidden))
            models.make_model(p, "llama", seed=seed, dtype="float32", layers=args.layers,
                              hidden=args.hidden, intermediate=args.intermediate)
        ck[which] = p
    size = ckpt_bytes(ck["B"])
    gib = size / 2**30
    log("checkpoint: %.2f GiB" % gib)

    fig = {"bytes": size, "restart_s": [], "reload_cold_s": [], "reload_warm_s": [],
           "reload_memory_s": [],
           "ckpt_vllm_s": [], "ckpt_worker_s": [], "memcpy_gbps": [], "read_cold_gbps": [],
           "register_s": [], "stage": []}

    log("(a) restarting vLLM on B (default multi-process mode) ...")
    r = restart(ck["B"])
    fig["restart_s"].append(r["ready_s"])
    tokens_b = r["tokens"]
    log("    ready after %.1f s" % r["ready_s"])

    import mpijob
    from ckpt_engine import vllm as ckv
    from vllm_helpers import close_llm, greedy, make_llm

    llm = make_llm(ck["A"], "float32")
    tokens_a = greedy(llm)
    assert tokens_a != tokens_b, "A and B answer alike: the verification would mean nothing"
    dep = mpijob.Deployment(tempfile.mkdtemp(prefix="ckpt-bench-vllm-"), 1)
    srv = mpijob.InteractiveServe(dep, nranks=1)
    failures = []
    try:
        for name in ("a", "b"):
            res = srv.command("register %s %s" % (name, ck[name.upper()]), 600)
            assert res["ok"], res
            fig["register_s"].append(res["seconds"])

        def ckpt_update(name, want):
            t = time.perf_counter()
            srv.send("update %s" % name)
            results = ckv.update(llm, socket_dir=dep.sock, timeout_s=120)
            res = srv.result(300)
            dt = time.perf_counter() - t
            ok = res["ok"] and all(x["completed"] for x in results) and greedy(llm) == want
            if not ok:
                failures.append("ckpt-engine update of %s: %s" % (name, res.get("reason")))
            fig["stage"].append({"total_s": dt, "engine_pipeline_s": res["pipeline_s"],
                                 "worker_reload_s": results[0]["reload_s"],
                                 "worker_engine_wait_s": results[0]["engine_wait_s"],
                                 "copied_bytes": results[0]["copied_bytes"],
                                 "buckets": res["buckets"]})
            return dt

        def disk_reload(path, want, cold):
            if cold:
                drop_cache(path)
            else:
                read_files(path)
            t = time.perf_counter()
            llm.collective_rpc("reload_weights", kwargs={"weights_path": path,
                                                         "is_checkpoint_format": True})
            llm.reset_prefix_cache()
            dt = time.perf_counter() - t
            if greedy(llm) != want:
                failures.append("vLLM reload of %s (%s)" % (path, "cold" if cold else "warm"))
            return dt

        def memory_reload(tensors, want):
            """vLLM's own loading and packing alone: the tensors already in this process's
            memory (the floor of any in-place update into vLLM)."""
            t = time.perf_counter()
            llm.collective_rpc("reload_weights", kwargs={
                "weights_iterator": iter(list(tensors.items())), "is_checkpoint_format": True})
            llm.reset_prefix_cache()
            dt = time.perf_counter() - t
            if greedy(llm) != want:
                failures.append("vLLM reload from memory")
            return dt

        from safetensors.torch import load_file
        in_memory_b = {}
        for f in sorted(os.listdir(ck["B"])):
            if f.endswith(".safetensors"):
                in_memory_b.update(load_file(os.path.join(ck["B"], f)))

        for i in range(args.repeat):
            log("round %d/%d: ckpt-engine update, reload cold, ckpt-engine update, reload "
                "warm, reload from memory, floors" % (i + 1, args.repeat))
            fig["ckpt_vllm_s"].append(ckpt_update("b", tokens_b))
            fig["reload_cold_s"].append(disk_reload(ck["A"], tokens_a, True))
            fig["ckpt_vllm_s"].append(ckpt_update("b", tokens_b))
            fig["reload_warm_s"].append(disk_reload(ck["A"], tokens_a, False))
            fig["reload_memory_s"].append(memory_reload(in_memory_b, tokens_b))
            fig["reload_warm_s"].append(disk_reload(ck["A"], tokens_a, False))
            fig["memcpy_gbps"].append(memcpy_floor(size))
            drop_cache(ck["B"])
            t = time.perf_counter()
            n = read_files(ck["B"])
            fig["read_cold_gbps"].append(n / (time.perf_counter() - t) / 1e9)
    finally:
        close_llm(llm)
        srv.close()

    log("(c) ckpt-engine into the reference worker (ckpt-worker) ...")
    dep2 = mpijob.Deployment(tempfile.mkdtemp(prefix="ckpt-bench-worker-"), 1)
    # Not Deployment.start_worker: it adds --dump, and a worker writing a 1 GiB dump
    # inside every update's post-hook would measure the disk, not the transfer.
    wlog = open(os.path.join(dep2.tmp, "worker-0.log"), "ab")
    dep2.workers[0] = subprocess.Popen(
        [mpijob.WORKER, "--socket", os.path.join(dep2.sock, "rank-0.sock"), "--layout",
         ck["B"], "--verify", "--timeout-ms", "60000"], stdout=wlog, stderr=subprocess.STDOUT)
    cmds = ["register b %s" % ck["B"]] + ["update b verify=1"] * args.repeat
    p, results = dep2.serve(cmds, timeout=600)
    dep2.stop()
    ups = [x for x in results if x.get("command") == "update"]
    for u in ups:
        if not u["ok"]:
            failures.append("reference worker: %s" % u["reason"])
        fig["ckpt_worker_s"].append(u["total_s"])
    if "verified" not in dep2.worker_log(0) and "complete" not in dep2.worker_log(0):
        failures.append("reference worker did not report its updates")

    m = {k: median(v) for k, v in fig.items() if isinstance(v, list) and v and
         not isinstance(v[0], dict)}
    upd = m["ckpt_vllm_s"]
    st = fig["stage"]
    print()
    print("vLLM %s, random Llama %d layers hidden %d, %.2f GiB float32, medians of %d"
          % ("0.32 (CPU)", args.layers, args.hidden, gib, args.repeat))
    print("%-52s %9s %9s" % ("method", "seconds", "vs ckpt"))
    rows = [("(a) restart vLLM on the new checkpoint", m["restart_s"]),
            ("(b) vLLM reload from disk, page cache cold", m["reload_cold_s"]),
            ("(b) vLLM reload from disk, page cache warm", m["reload_warm_s"]),
            ("(d) ckpt-engine update, in place into vLLM", upd),
            ("    vLLM reload from tensors already in memory", m["reload_memory_s"]),
            ("(c) ckpt-engine update into ckpt-worker (transfer)", m["ckpt_worker_s"])]
    for label, s in rows:
        print("%-52s %9.3f %8.1fx" % (label, s, s / upd))
    print("stages of (d): engine pipeline %.3f s, vLLM reload incl. waiting for buckets "
          "%.3f s (of it waiting %.3f s), copied for layers cut by buckets %.1f MiB"
          % (median([x["engine_pipeline_s"] for x in st]),
             median([x["worker_reload_s"] for x in st]),
             median([x["worker_engine_wait_s"] for x in st]),
             median([x["copied_bytes"] for x in st]) / 2**20))
    print("floors: memcpy %.2f GB/s (%.3f s for the checkpoint), cold read %.2f GB/s "
          "(%.3f s); registration %.3f s"
          % (m["memcpy_gbps"], size / m["memcpy_gbps"] / 1e9, m["read_cold_gbps"],
             size / m["read_cold_gbps"] / 1e9, m["register_s"]))
    print("vLLM's own loading and packing (reload from memory) is %.0f%% of the in-place "
          "update" % (100 * m["reload_memory_s"] / upd))
    print("update vs restart: %.1fx faster; vs cold reload: %.1fx; vs warm reload: %.1fx"
          % (m["restart_s"] / upd, m["reload_cold_s"] / upd, m["reload_warm_s"] / upd))
    for f in failures:
        print("FAILED: " + f)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"figures": fig, "medians": m, "failures": failures}, f, indent=1)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
