"""ckpt-engine's update of one torch GPU worker, timed, with the H2D floor measured in the
same run (before and after).

    python3 bench/gpu/run_update.py --size 8GiB                 # checkpoint on disk
    python3 bench/gpu/run_update.py --size 32GiB --in-memory    # published from memory

On disk: `ckpt-engine gen --out DIR --size SIZE --shards 8`, then `register m DIR`. In
memory: the same tensors as gen would write (names, shapes, dtypes), filled on the GPU and
published by this process with ckpt_engine.publish (docs/PUBLISH.md: one sealed memfd the
engine adopts), registered by `await-published m`; the worker's layout is a sparse
safetensors file (header only, no data on disk). Either way one worker,
`tests/gpu/torch_worker.py --device cuda --verify` (it compares every tensor with the files
after each update; in memory there are none, so no --verify, and the first update is
`verify=1`: the worker checks each tensor's XXH3-64 as it arrives), and one engine rank,
`mpirun -np 1 ckpt-engine serve --device cuda --json --commands -` (or a singleton), running
`update m verify=0` --updates times (default 3). Commands go in one at a time: each update
once the worker has reported the previous one (its file comparison stays out of the next
update's time).

Prints `update_s=` (median of the last two updates' total_s), `update_gbs=`, `h2d_gbs=`
(stage_bytes / stage_s of the result when it has them, else the update's GB/s, and says
which), `per_worker_gbps=`, `floor_before_gbs=`, `floor_after_gbs=`, and writes them with
every result to --summary FILE (JSON). Exit status 0 when every update completed and the
worker verified each, 1 otherwise (the cause is printed).

--device cpu|sim|none and --worker ckpt run the same orchestration without a GPU (the
reference ckpt-worker, numpy data; none: serve gets no --device flag)."""
import argparse
import json
import os
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
sys.path.insert(1, os.path.join(ROOT, "python"))  # ckpt_engine (publish), run from anywhere
from h2d_floor import measure as measure_floor, parse_size  # noqa: E402

CHILDREN = []


def log(msg):
    print("run_update: %s" % msg, flush=True)


class Failure(Exception):
    pass


def start(cmd, out_path, **kw):
    log("$ " + " ".join(cmd))
    f = open(out_path, "w")
    p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, **kw)
    p.log_path = out_path
    CHILDREN.append(p)
    return p


def stop_children():
    for p in CHILDREN:
        if p.poll() is None:
            p.terminate()
    deadline = time.time() + 5
    for p in CHILDREN:
        try:
            p.wait(max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def on_signal(signum, _frame):
    raise SystemExit("run_update: stopped by signal %d" % signum)


def tail(path, n=25):
    try:
        with open(path, errors="replace") as f:
            lines = f.readlines()
    except OSError:
        return "(no %s)" % path
    return "".join(lines[-n:])


def json_lines(path):
    out = []
    try:
        with open(path, errors="replace") as f:
            for line in f:
                line = line.strip()
                if line.startswith("{"):
                    try:
                        out.append(json.loads(line))
                    except ValueError:
                        pass
    except OSError:
        pass
    return out


def wait_for(pred, timeout, what, procs):
    """pred()'s first true value within timeout seconds; a Failure naming what was awaited
    when it does not come or one of procs [(Popen, name, log)] exits first."""
    deadline = time.time() + timeout
    while True:
        v = pred()
        if v:
            return v
        for p, name, path in procs:
            if p.poll() is not None:
                raise Failure("%s exited (status %s) while waiting for %s:\n%s"
                              % (name, p.returncode, what, tail(path)))
        if time.time() > deadline:
            raise Failure("no %s within %d s:\n%s" % (what, timeout, "\n".join(
                "-- %s:\n%s" % (name, tail(path, 8)) for _, name, path in procs)))
        time.sleep(0.05)


def worker_reports(path):
    """Updates the worker reported: the torch worker's JSON lines, ckpt-worker's
    'update N of ...: complete | aborted' lines."""
    n = 0
    try:
        with open(path, errors="replace") as f:
            for line in f:
                line = line.strip()
                if line.startswith("{") and '"update"' in line:
                    n += 1
                elif line.startswith("update ") and (": complete" in line or ": aborted" in line):
                    n += 1
    except OSError:
        pass
    return n


# ---- the synthetic model of `ckpt-engine gen` (tools/ckpt-engine/cmd_gen.c build_layout) ----
DTYPE_SIZE = {"BF16": 2, "F32": 4, "F16": 2}


def gen_layout(target, layers=8, wdt="BF16", ndt="F32"):
    """[(name, dtype, shape)] exactly as `ckpt-engine gen --size target --layers L` (dense)."""
    wsz, nsz = DTYPE_SIZE[wdt], DTYPE_SIZE[ndt]

    def inter_of(h):
        return (h * 11 // 4 + 7) // 8 * 8

    def vocab_of(h):
        return h * 16 if h * 16 < 32000 else 32000

    def model_bytes(h):
        weights = 2 * vocab_of(h) * h + layers * (4 * h * h + 3 * inter_of(h) * h)
        return weights * wsz + (layers * 2 + 1) * h * nsz

    h = 8
    while h < (1 << 20) and model_bytes(h + 8) <= target:
        h += 8
    if h >= 256:
        h = h // 64 * 64
    H, I, V = h, inter_of(h), vocab_of(h)
    out = [("model.embed_tokens.weight", wdt, (V, H))]
    for i in range(layers):
        for p in ("q_proj", "k_proj", "v_proj", "o_proj"):
            out.append(("model.layers.%d.self_attn.%s.weight" % (i, p), wdt, (H, H)))
        out.append(("model.layers.%d.mlp.gate_proj.weight" % i, wdt, (I, H)))
        out.append(("model.layers.%d.mlp.up_proj.weight" % i, wdt, (I, H)))
        out.append(("model.layers.%d.mlp.down_proj.weight" % i, wdt, (H, I)))
        out.append(("model.layers.%d.input_layernorm.weight" % i, ndt, (H,)))
        out.append(("model.layers.%d.post_attention_layernorm.weight" % i, ndt, (H,)))
    out.append(("model.norm.weight", ndt, (H,)))
    out.append(("lm_head.weight", wdt, (V, H)))
    return out


def nbytes_of(dtype, shape):
    n = DTYPE_SIZE[dtype]
    for d in shape:
        n *= d
    return n


def write_sparse_layout(path, layout):
    """A safetensors file with the layout's header and a hole for the data: what a worker's
    --layout reads (names, dtypes, shapes), no bytes on disk."""
    header, off = {}, 0
    for name, dt, shape in layout:
        n = nbytes_of(dt, shape)
        header[name] = {"dtype": dt, "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        f.truncate(8 + len(h) + off)
    return off


def make_tensors(layout, device, seed=1):
    """The layout's tensors filled with deterministic bytes: torch on `device` (a CUDA
    tensor is published straight from the GPU), else numpy (raw bits, (array, dtype))."""
    try:
        import torch
    except ImportError:
        torch = None
    if torch is not None and device not in ("cpu-numpy",):
        tdt = {"BF16": torch.bfloat16, "F32": torch.float32, "F16": torch.float16}
        dev = device if device in ("cuda", "cpu") else "cpu"
        g = torch.Generator(device=dev)
        g.manual_seed(seed)
        out = {}
        for name, dt, shape in layout:
            raw = torch.randint(0, 256, (nbytes_of(dt, shape),), dtype=torch.uint8, device=dev,
                                generator=g)
            out[name] = raw.view(tdt[dt]).view(shape)
        return out
    import numpy as np
    rng = np.random.default_rng(seed)
    ndt = {"BF16": np.uint16, "F16": np.uint16, "F32": np.uint32}
    return {name: (rng.integers(0, 256, nbytes_of(dt, shape), dtype=np.uint8)
                   .view(ndt[dt]).reshape(shape), dt) for name, dt, shape in layout}


# ---- results ----
def h2d_of(r):
    """(GB/s, how) of the host-to-device stage of one update result."""
    if r.get("stage_s") and r.get("stage_bytes"):
        return r["stage_bytes"] / r["stage_s"] / 1e9, "stage_bytes/stage_s of the result"
    for k in ("h2d_gbps", "h2d_gbs", "stage_gbps"):
        if r.get(k):
            return float(r[k]), "%s of the result" % k
    for k in ("h2d_s", "device_s"):
        if r.get(k):
            return r["bytes"] / r[k] / 1e9, "bytes/%s of the result" % k
    return None, "no stage time in the result: the update's bytes/total_s"


def median_last_two(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs[-2:]) if xs else None


def floor(args, when):
    if args.no_floor:
        return None
    try:
        res = measure_floor(1 << 30, 5)
    except Exception as e:  # noqa: BLE001
        log("floor %s the update: FAILED: %s: %s" % (when, type(e).__name__, e))
        return None
    log("floor %s the update: h2d_floor_gbs=%.3f (best of %s)" %
        (when, max(res), ", ".join("%.2f" % x for x in res)))
    return max(res)


def find_engine(args):
    cands = [args.engine] if args.engine else []
    if os.environ.get("CKPT_BUILD_DIR"):
        cands.append(os.path.join(os.environ["CKPT_BUILD_DIR"], "tools", "ckpt-engine"))
    cands += [shutil.which("ckpt-engine") or "", os.path.join(ROOT, "build/release/tools/ckpt-engine")]
    for c in cands:
        if c and os.access(c, os.X_OK):
            return c
    raise Failure("ckpt-engine not found (set CKPT_BUILD_DIR or --engine)")


def run(args):
    size = args.size
    eng = find_engine(args)
    work = tempfile.mkdtemp(prefix="run_update.", dir=args.workdir)
    summary = {"size": size, "mode": "memory" if args.in_memory else "disk", "device": args.device,
               "launcher": args.launcher, "worker": args.worker, "engine": eng, "ok": False}
    try:
        return _run(args, size, eng, work, summary)
    except Failure as e:
        summary["errors"] = summary.get("errors", []) + [str(e)]
        raise
    finally:
        stop_children()
        if args.summary:
            with open(args.summary, "w") as f:
                json.dump(summary, f, indent=1)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            log("kept %s" % work)


def _run(args, size, eng, work, summary):
    model, sock = os.path.join(work, "model"), os.path.join(work, "sock")
    reuse = False
    if args.model and not args.in_memory:
        model = os.path.abspath(args.model)
        reuse = os.path.exists(os.path.join(model, "model.safetensors.index.json")) or \
            os.path.exists(os.path.join(model, "model.safetensors"))
    os.makedirs(sock)
    gpu = args.device == "cuda"
    # room first: a clear message beats ENOSPC or the OOM killer halfway
    if args.in_memory:
        avail = 0
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
        if avail < size * 1.3:
            raise Failure("in memory: %.1f GiB available, %.1f GiB needed (1.3 x the checkpoint)"
                          % (avail / 2**30, size * 1.3 / 2**30))
    elif not reuse:
        free = shutil.disk_usage(work).free
        if free < size + (1 << 30):
            raise Failure("on disk: %.1f GiB free in %s, %.1f GiB needed"
                          % (free / 2**30, work, (size + (1 << 30)) / 2**30))

    summary["floor_before_gbs"] = floor(args, "before") if gpu else None

    layout = None
    if args.in_memory:
        layout = gen_layout(size)
        os.makedirs(model)
        total = write_sparse_layout(os.path.join(model, "model.safetensors"), layout)
        log("in memory: %d tensors, %d bytes (gen's shapes for --size %d), sparse layout in %s"
            % (len(layout), total, size, model))
    elif reuse:
        log("reusing the checkpoint in %s" % model)
    else:
        t = time.time()
        r = subprocess.run([eng, "gen", "--out", model, "--size", str(size), "--shards",
                            str(args.shards)], capture_output=True, text=True,
                           timeout=args.gen_timeout)
        if r.returncode != 0:
            raise Failure("ckpt-engine gen failed (%d): %s%s" % (r.returncode, r.stdout, r.stderr))
        summary["gen_s"] = time.time() - t
        log(r.stdout.strip())

    # the worker
    wjson = os.path.join(work, "worker.json")
    if args.worker == "torch":
        tw = os.path.join(ROOT, "tests", "gpu", "torch_worker.py")
        if not os.path.exists(tw):
            raise Failure("%s not found (the GPU tests' torch worker)" % tw)
        # --verify compares with the layout's files: in memory they are a sparse header only
        wcmd = [sys.executable, tw, "--socket", os.path.join(sock, "rank-0.sock"), "--layout",
                model, "--device", "cuda" if gpu else "cpu", "--updates", str(args.updates),
                "--json", wjson] + ([] if args.in_memory else ["--verify"])
    else:
        wcmd = [os.path.join(os.path.dirname(eng), "ckpt-worker"), "--socket",
                os.path.join(sock, "rank-0.sock"), "--layout", model, "--verify", "--updates",
                str(args.updates), "--post-hook-sleep-ms", "0", "--timeout-ms", "60000"]
    worker = start(wcmd, os.path.join(work, "worker.log"))

    # the engine rank
    # The engine rank reads its commands from stdin, one at a time: each update is sent once
    # the worker has reported (and checked) the previous one, so a worker busy comparing
    # its bytes with the files never shows up in the next update's time.
    launch = []
    if args.launcher == "mpirun":
        mpirun = shutil.which("mpirun")
        if not mpirun:
            raise Failure("mpirun not on PATH (the bundle's ompi/bin)")
        launch = [mpirun, "-np", "1", "--bind-to", "none"]
        if os.geteuid() == 0:
            launch.append("--allow-run-as-root")
    scmd = launch + [eng, "serve", "--socket-dir", sock, "--commands", "-", "--json",
                     "--timeout-ms", str(args.timeout_ms)]
    if args.device != "none":
        scmd += ["--device", args.device]
    serve_log = os.path.join(work, "serve.log")
    t_serve = time.time()
    serve = start(scmd, serve_log, stdin=subprocess.PIPE, text=True)
    procs = [(serve, "serve", serve_log), (worker, "the worker", worker.log_path)]

    def command(line):
        log("serve < " + line)
        try:
            serve.stdin.write(line + "\n")
            serve.stdin.flush()
        except (BrokenPipeError, OSError):
            raise Failure("serve is gone (status %s):\n%s" % (serve.poll(), tail(serve_log)))

    def results(kind):
        return [o for o in json_lines(serve_log) if o.get("command") in kind]

    if args.worker == "torch":  # its first line says the model is allocated: it connects next
        wait_for(lambda: "torch_worker:" in tail(worker.log_path, 200), args.worker_timeout,
                 "the worker's model allocated", procs)
    if args.in_memory:
        command("await-published m timeout=%d" % (args.publish_timeout * 1000))
        publish_path = os.path.join(sock, "publish-0.sock")
        wait_for(lambda: os.path.exists(publish_path), 60, publish_path, procs)
        from ckpt_engine import publish
        t = time.time()
        tensors = make_tensors(layout, "cuda" if gpu else "cpu")
        if gpu:
            import torch
            torch.cuda.synchronize()
        summary["fill_s"] = time.time() - t
        t = time.time()
        res = publish("m", tensors, socket_dir=sock, rank=0, wait=True,
                      timeout_s=args.publish_timeout)
        summary["publish_s"] = time.time() - t
        log("published %d tensors in %.2f s (filled in %.2f s): %s"
            % (len(tensors), summary["publish_s"], summary["fill_s"], res.text))
        del tensors
        if gpu:
            import torch
            torch.cuda.empty_cache()
    else:
        command("register m %s" % model)
    reg = wait_for(lambda: results(("register", "await-published")), args.register_timeout,
                   "the registration's result", procs[:1])
    if not reg[0].get("ok"):
        raise Failure("%s failed: %s %s" % (reg[0].get("command"), reg[0].get("status"),
                                            reg[0].get("reason")))
    log("registered in %.2f s" % reg[0].get("seconds", 0))
    # In memory the worker has no files to compare with: the first (untimed) update has it
    # check every tensor's XXH3-64 as it arrives (the engine's checksums of the published
    # bytes) instead.
    first_verify = args.in_memory and not args.no_first_verify
    for k in range(1, args.updates + 1):
        command("update m verify=%d" % (1 if first_verify and k == 1 else 0))
        ups = wait_for(lambda: (lambda u: u if len(u) >= k else None)(results(("update",))),
                       args.update_timeout, "update %d's result" % k, procs[:1])
        if not ups[-1].get("ok"):
            log("update %d failed: %s %s" % (k, ups[-1].get("status"), ups[-1].get("reason")))
            break
        wait_for(lambda: worker_reports(worker.log_path) >= k, args.update_timeout,
                 "the worker's report of update %d" % k, procs[1:])
    command("quit")
    try:
        serve.stdin.close()
    except OSError:
        pass
    try:
        serve.wait(timeout=60)
    except subprocess.TimeoutExpired:
        raise Failure("serve did not stop within 60 s of quit:\n%s" % tail(serve_log))
    summary["serve_s"] = time.time() - t_serve
    grace = 60 if serve.returncode == 0 else 5  # a failed engine leaves the worker waiting
    try:
        worker.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        worker.kill()
        worker.wait()
        worker.killed = True
        log("the worker did not exit %d s after serve: killed" % grace)
    summary["floor_after_gbs"] = floor(args, "after") if gpu else None

    # results
    out = json_lines(serve_log)
    errors = []
    if serve.returncode != 0:
        errors.append("serve exited with status %d" % serve.returncode)
    reg = [o for o in out if o.get("command") in ("register", "await-published", "publish")]
    for o in reg:
        if not o.get("ok", True):
            errors.append("%s failed: %s %s" % (o.get("command"), o.get("status"), o.get("reason")))
    summary["register"] = reg
    ups = [o for o in out if o.get("command") == "update"]
    summary["updates"] = ups
    bad = [o for o in ups if not o.get("ok")]
    for o in bad:
        errors.append("update %s failed: %s %s (rank %s)" % (o.get("update_id"), o.get("status"),
                                                            o.get("reason"), o.get("failed_rank")))
    if len(ups) != args.updates:
        errors.append("%d update results, %d expected" % (len(ups), args.updates))
    wres = [o for o in json_lines(worker.log_path) if "update" in o]
    if not wres and os.path.exists(wjson):
        wres = [o for o in json_lines(wjson) if "update" in o]
        if not wres:
            try:
                with open(wjson) as f:
                    j = json.load(f)
                wres = j if isinstance(j, list) else j.get("updates", [j])
            except (OSError, ValueError, AttributeError):
                pass
    summary["worker_results"] = wres
    if args.worker == "torch":
        if len(wres) != args.updates:
            errors.append("the worker reported %d updates, %d expected" % (len(wres), args.updates))
        incomplete = [o.get("update") for o in wres if o.get("completed") is False]
        if incomplete:
            errors.append("the worker's updates %s did not complete: %s" %
                          (incomplete, [o.get("reason") for o in wres if o.get("completed") is False]))
        if args.in_memory:
            summary["verified"] = ("the first update's XXH3-64 of every tensor (verify=1)"
                                   if first_verify else "not checked (in memory, no files)")
        else:
            unverified = [o.get("update") for o in wres if o.get("verified") is not True]
            if unverified:
                errors.append("the worker did not verify updates %s" % unverified)
            summary["verified"] = not unverified
    else:
        with open(worker.log_path, errors="replace") as f:
            complete = sum(1 for line in f if ": complete" in line)
        if complete != args.updates:
            errors.append("ckpt-worker completed %d of %d updates" % (complete, args.updates))
    if worker.returncode not in (0, None) and not getattr(worker, "killed", False):
        errors.append("the worker exited with status %d" % worker.returncode)

    good = [o for o in ups if o.get("ok")]
    if good:
        nbytes = good[-1]["bytes"]
        upd = median_last_two([o["total_s"] for o in good])
        h2ds = [h2d_of(o) for o in good]
        summary.update({
            "bytes": nbytes, "tensors": good[-1].get("tensors"),
            "update_s_all": [o["total_s"] for o in good], "update_s": upd,
            "update_gbs": nbytes / upd / 1e9 if upd else None,
            "per_worker_gbps": median_last_two([o.get("per_worker_gbps") for o in good]),
            "h2d_gbs": median_last_two([g for g, _ in h2ds]), "h2d_source": h2ds[-1][1],
            "worker_s": median_last_two([o.get("seconds") for o in wres]),
        })
        if summary["h2d_gbs"] is None:
            summary["h2d_gbs"] = summary["update_gbs"]
        timing_keys = sorted(k for k in good[-1] if k.endswith("_s") or k.endswith("_bytes"))
        log("last result's times and byte counts: " +
            ", ".join("%s=%s" % (k, good[-1][k]) for k in timing_keys))
    summary["errors"] = errors
    summary["ok"] = not errors
    for k in ("update_s", "update_gbs", "h2d_gbs", "per_worker_gbps", "worker_s",
              "floor_before_gbs", "floor_after_gbs"):
        v = summary.get(k)
        print("%s=%s" % (k, "%.4f" % v if isinstance(v, (int, float)) else "n/a"))
    print("h2d_source=%s" % summary.get("h2d_source", "n/a"))
    if errors:
        for e in errors:
            log("FAILED: " + e)
        log("serve output (last lines):\n" + tail(serve_log))
        log("worker output (last lines):\n" + tail(worker.log_path))
        return 1
    log("ok: %d updates of %s bytes, %s" % (len(ups), summary.get("bytes"),
        "the worker verified each" if summary.get("verified") is True else
        "the worker completed each (%s)" % summary.get("verified", "ckpt-worker: checksums")))
    return 0


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=parse_size, default=8 << 30)
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--in-memory", action="store_true")
    ap.add_argument("--model", metavar="DIR", help="on disk: generate the checkpoint into DIR "
                    "and keep it, or reuse the one there (reference_ce.py --model DIR reads it)")
    ap.add_argument("--updates", type=int, default=3)
    ap.add_argument("--launcher", choices=("mpirun", "singleton"), default="mpirun")
    ap.add_argument("--device", choices=("cuda", "cpu", "sim", "none"), default="cuda")
    ap.add_argument("--worker", choices=("torch", "ckpt"), default="torch")
    ap.add_argument("--engine", help="ckpt-engine binary (default: $CKPT_BUILD_DIR/tools, PATH)")
    ap.add_argument("--workdir", default=os.environ.get("GC_WORK") or tempfile.gettempdir())
    ap.add_argument("--summary", metavar="FILE", help="write the figures and results as JSON")
    ap.add_argument("--no-floor", action="store_true")
    ap.add_argument("--timeout-ms", type=int, default=120000, help="serve --timeout-ms")
    ap.add_argument("--gen-timeout", type=int, default=150)
    ap.add_argument("--publish-timeout", type=int, default=150)
    ap.add_argument("--register-timeout", type=int, default=150)
    ap.add_argument("--update-timeout", type=int, default=120)
    ap.add_argument("--worker-timeout", type=int, default=120,
                    help="for the worker to allocate its model")
    ap.add_argument("--no-first-verify", action="store_true",
                    help="in memory: the first update with verify=0 too (no check at all)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    a = ap.parse_args()
    if a.updates < 2:
        ap.error("--updates must be at least 2 (the time is the median of the last two)")
    signal.signal(signal.SIGTERM, on_signal)
    try:
        return run(a)
    except Failure as e:
        log("FAILED: %s" % e)
        return 1
    except subprocess.TimeoutExpired as e:
        log("FAILED: %s timed out after %s s" % (" ".join(map(str, e.cmd)), e.timeout))
        return 1
    finally:
        stop_children()


if __name__ == "__main__":
    sys.exit(main())
