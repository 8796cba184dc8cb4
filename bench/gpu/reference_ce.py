"""The reference: the same checkpoint updated through checkpoint-engine 0.4.2 (MoonshotAI,
the system behind Kimi K2's weight updates), one GPU, one process per role.

    python3 bench/gpu/reference_ce.py --size 8GiB [--model DIR] [--summary FILE]

The checkpoint is `ckpt-engine gen --size SIZE --shards 8` (deterministic: the same bytes
run_update.py sends), or the one already in --model DIR. Its safetensors files are
registered with checkpoint-engine's ParameterServer, which copies them into pinned host
buckets; each update then copies buckets host -> device and hands them over to the consumer
through CUDA IPC and ZMQ, as checkpoint-engine does for a colocated vLLM.

Roles, as in checkpoint-engine 0.4.2's own sources (ps.py, worker.py):
  this process   ParameterServer(rank=0, world_size=1, auto_pg=False, master_addr=...,
                 master_port=...) [RANK=0 WORLD_SIZE=1 in the environment too: ps.py reads
                 `rank or int(os.environ["RANK"])`, and 0 is falsy]; register_checkpoint(name,
                 files=[...]); init_process_group(); gather_metas(name); then per update
                 update(name, req_func): req_func(socket_paths) runs in ps.update's thread
                 and tells the consumer which ZMQ handle is its GPU's.
  the consumer   a second process (CUDA IPC needs one): every tensor preallocated on the GPU;
                 per update checkpoint_engine.worker.update_weights_from_ipc(zmq_ctx,
                 zmq_handle, device_id=0, run=copy_into_model), where copy_into_model copies
                 each received tensor into its preallocated one (what our torch worker does).
auto_pg=False keeps one NCCL process group for all updates (auto_pg=True would create and
destroy it inside every update: slower, so the reference is timed at its best). One warm-up
update, then --updates timed ones (ps.update's wall time); the median is printed as
`reference_update_s=<float>`. After the timed updates the consumer compares every tensor it
holds, on the GPU, with the files' bytes (outside the timed part)."""
import argparse
import json
import mmap
import os
import queue
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
from h2d_floor import parse_size  # noqa: E402

MARK = "@@ "  # the consumer's protocol lines on its stdout start with this


def log(msg):
    print("reference_ce: %s" % msg, flush=True)


class Failure(Exception):
    pass


def read_header(path):
    """(data start, {name: (dtype, shape, start, end)}) of a safetensors file."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        h = json.loads(f.read(n))
    h.pop("__metadata__", None)
    return 8 + n, {k: (v["dtype"], tuple(v["shape"]), v["data_offsets"][0], v["data_offsets"][1])
                   for k, v in h.items()}


def checkpoint_files(model):
    files = sorted(os.path.join(model, f) for f in os.listdir(model) if f.endswith(".safetensors"))
    if not files:
        raise Failure("no .safetensors files in %s" % model)
    return files


def quiet_loguru():
    try:
        from loguru import logger
        logger.remove()
        logger.add(sys.stderr, level="WARNING")
    except ImportError:
        pass


# ------------------------------------------------------------------ the consumer process
def verify_against_files(model_t, where, device):
    """Names of the tensors whose bytes differ from the files' (compared on `device`)."""
    import torch
    bad, maps = [], {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # frombuffer on a read-only mapping
        try:
            for name, (path, off, n) in where.items():
                if n == 0:
                    continue
                if path not in maps:
                    with open(path, "rb") as f:
                        maps[path] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
                exp = torch.frombuffer(maps[path], dtype=torch.uint8, count=n, offset=off).to(device)
                got = model_t[name].reshape(-1).view(torch.uint8)
                if not torch.equal(got, exp):
                    bad.append(name)
                del exp, got
        finally:
            for m in maps.values():
                try:
                    m.close()
                except BufferError:
                    pass
    return bad


def torch_dtypes():
    import torch
    dtypes = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32,
              "F64": torch.float64, "I8": torch.int8, "U8": torch.uint8, "I16": torch.int16,
              "I32": torch.int32, "I64": torch.int64, "BOOL": torch.bool}
    for st, attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2")):
        if hasattr(torch, attr):
            dtypes[st] = getattr(torch, attr)
    return dtypes


def load_layout(model, device):
    """The model's tensors preallocated (zeros) on device, and where each one's bytes lie in
    the files: ({name: tensor}, {name: (path, offset, nbytes)}, total bytes)."""
    import torch
    dtypes = torch_dtypes()
    model_t, where = {}, {}
    for path in checkpoint_files(model):
        base, hdr = read_header(path)
        for name, (dt, shape, s, e) in hdr.items():
            model_t[name] = torch.zeros(shape, dtype=dtypes[dt], device=device)
            where[name] = (path, base + s, e - s)
    total = sum(t.numel() * t.element_size() for t in model_t.values())
    return model_t, where, total


def consumer(model):
    import torch
    import zmq
    from checkpoint_engine.worker import update_weights_from_ipc
    quiet_loguru()
    torch.cuda.set_device(0)
    model_t, where, total = load_layout(model, "cuda")
    torch.cuda.synchronize()
    # the key checkpoint-engine uses for this GPU (ps.py _get_physical_gpu_id)
    uuid = "GPU-%s" % torch.cuda.get_device_properties(0).uuid
    ctx = zmq.Context()
    seen = set()

    def copy_into_model(weights):
        for name, t in weights:
            dst = model_t.get(name)
            if dst is None:
                raise KeyError("tensor %r is not in the model" % name)
            if dst.shape != t.shape or dst.dtype != t.dtype:
                raise ValueError("tensor %r: %s %s received, %s %s in the model" %
                                 (name, t.dtype, tuple(t.shape), dst.dtype, tuple(dst.shape)))
            dst.copy_(t)
            seen.add(name)

    def reply(*words):
        print(MARK + " ".join(str(w) for w in words), flush=True)

    reply("ready", uuid, len(model_t), total)
    for line in sys.stdin:
        msg = json.loads(line)
        if msg["cmd"] == "update":
            paths = msg["paths"]
            handle = paths.get(uuid) or (next(iter(paths.values())) if len(paths) == 1 else None)
            if handle is None:
                reply("error", "no ZMQ handle for %s among %s" % (uuid, list(paths)))
                continue
            seen.clear()
            try:
                update_weights_from_ipc(ctx, handle, device_id=0, run=copy_into_model)
            except Exception as e:  # noqa: BLE001
                reply("error", "%s: %s" % (type(e).__name__, e))
                continue
            missing = len(model_t) - len(seen)
            reply("done", len(seen), missing)
        elif msg["cmd"] == "verify":
            bad = verify_against_files(model_t, where, "cuda")
            if bad:
                reply("verified", "FAIL", len(bad), ",".join(bad[:5]))
            else:
                reply("verified", "ok", len(model_t), total)
        elif msg["cmd"] == "quit":
            break
    ctx.term()


# ------------------------------------------------------------- the parameter server side
class Consumer:
    def __init__(self, model, log_path):
        self.log_path = log_path
        self.err = open(log_path, "w")
        self.p = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--consumer",
                                   "--model", model], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=self.err, text=True)
        self.q = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.p.stdout:
            if line.startswith(MARK):
                self.q.put(line[len(MARK):].split())
            else:
                sys.stdout.write("consumer: " + line)
        self.q.put(None)

    def send(self, **msg):
        self.p.stdin.write(json.dumps(msg) + "\n")
        self.p.stdin.flush()

    def recv(self, timeout):
        try:
            words = self.q.get(timeout=timeout)
        except queue.Empty:
            raise Failure("the consumer said nothing for %d s:\n%s" % (timeout, self.tail()))
        if words is None:
            raise Failure("the consumer exited (%s):\n%s" % (self.p.wait(), self.tail()))
        return words

    def tail(self, n=25):
        self.err.flush()
        with open(self.log_path, errors="replace") as f:
            return "".join(f.readlines()[-n:])

    def close(self):
        if self.p.poll() is None:
            try:
                self.send(cmd="quit")
                self.p.wait(10)
            except Exception:  # noqa: BLE001
                self.p.kill()
                self.p.wait()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def find_engine():
    cands = []
    if os.environ.get("CKPT_BUILD_DIR"):
        cands.append(os.path.join(os.environ["CKPT_BUILD_DIR"], "tools", "ckpt-engine"))
    cands += [shutil.which("ckpt-engine") or "", os.path.join(ROOT, "build/release/tools/ckpt-engine")]
    for c in cands:
        if c and os.access(c, os.X_OK):
            return c
    raise Failure("ckpt-engine not found (to generate the checkpoint): set CKPT_BUILD_DIR")


def run(a, summary):
    import torch
    if not torch.cuda.is_available():
        raise Failure("torch.cuda.is_available() is False")
    import checkpoint_engine
    import checkpoint_engine.device_utils as ce_device
    import checkpoint_engine.ps as ce_ps
    from checkpoint_engine.ps import ParameterServer
    quiet_loguru()
    summary["checkpoint_engine"] = getattr(checkpoint_engine, "__version__", "?")
    log("checkpoint-engine %s from %s" % (summary["checkpoint_engine"],
                                          os.path.dirname(checkpoint_engine.__file__)))

    model = a.model
    if not (model and os.path.isdir(model) and any(f.endswith(".safetensors")
                                                   for f in os.listdir(model))):
        if not model:
            a.generated = tempfile.mkdtemp(prefix="reference_ce.", dir=a.workdir)
            model = os.path.join(a.generated, "model")
        t = time.time()
        r = subprocess.run([find_engine(), "gen", "--out", model, "--size", str(a.size),
                            "--shards", "8"], capture_output=True, text=True, timeout=150)
        if r.returncode != 0:
            raise Failure("ckpt-engine gen failed: %s%s" % (r.stdout, r.stderr))
        log("%s (%.1f s)" % (r.stdout.strip(), time.time() - t))
    files = checkpoint_files(model)
    nbytes = 0
    for path in files:
        nbytes += sum(e - s for _, _, s, e in read_header(path)[1].values())
    summary["bytes"] = nbytes

    log_path = os.path.join(a.workdir, "reference_ce.consumer.%d.log" % os.getpid())
    cons = Consumer(model, log_path)
    try:
        words = cons.recv(120)
        if words[0] != "ready":
            raise Failure("consumer: %s" % " ".join(words))
        log("consumer ready: %s tensors, %s bytes on %s" % (words[2], words[3], words[1]))

        # checkpoint-engine's host IP comes from a UDP connect to 8.8.8.8, falling back to
        # the host name; on a machine without network both may fail: loopback then (one
        # host, one rank: the address is never used to connect).
        try:
            ce_device.get_ip()
        except Exception as e:  # noqa: BLE001
            log("checkpoint_engine get_ip() failed (%s): using 127.0.0.1" % e)
            ce_ps.get_ip = lambda: "127.0.0.1"
        os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        port = free_port()
        os.environ["MASTER_PORT"] = str(port - 1)  # ps.py uses MASTER_PORT + 1 when not given
        ps = ParameterServer(rank=0, world_size=1, auto_pg=False, master_addr="127.0.0.1",
                             master_port=port)
        t = time.time()
        ps.register_checkpoint("ref", files=files)
        summary["register_s"] = time.time() - t
        log("register_checkpoint: %d files, %d bytes in %.2f s" % (len(files), nbytes,
                                                                 summary["register_s"]))
        ps.init_process_group()
        ps.gather_metas("ref")

        state = {}

        def req_func(socket_paths):
            # ps.update's thread: hand the consumer its ZMQ handle, wait until it is done
            try:
                cons.send(cmd="update", paths=dict(socket_paths))
                state["reply"] = cons.recv(a.update_timeout)
            except Exception as e:  # noqa: BLE001
                state["reply"] = ["error", str(e)]

        times = []
        for i in range(1 + a.updates):
            state.clear()
            torch.cuda.synchronize()
            t = time.perf_counter()
            ps.update("ref", req_func)
            dt = time.perf_counter() - t
            reply = state.get("reply", ["error", "req_func never ran"])
            if reply[0] != "done":
                raise Failure("update %d: consumer: %s" % (i, " ".join(reply)))
            if int(reply[2]) != 0:
                raise Failure("update %d: %s tensors never reached the consumer" % (i, reply[2]))
            log("update %d%s: %.3f s, %.2f GB/s (%s tensors)" %
                (i, " (warm-up)" if i == 0 else "", dt, nbytes / dt / 1e9, reply[1]))
            if i > 0:
                times.append(dt)
        cons.send(cmd="verify")
        v = cons.recv(180)
        if v[:2] != ["verified", "ok"]:
            raise Failure("the consumer's bytes differ from the files: %s" % " ".join(v))
        log("consumer verified %s tensors, %s bytes against the files" % (v[2], v[3]))
        med = statistics.median(times)
        summary.update({"update_s_all": times, "update_s": med, "update_gbs": nbytes / med / 1e9,
                        "ok": True})
        print("reference_update_s=%.4f" % med)
        print("reference_update_gbs=%.3f" % (nbytes / med / 1e9))
        try:
            import checkpoint_engine.distributed as ce_dist
            if ce_dist.is_initialized():
                ce_dist.destroy_process_group()
        except Exception:  # noqa: BLE001
            pass
        return 0
    finally:
        cons.close()


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=parse_size, default=8 << 30)
    ap.add_argument("--model", metavar="DIR", help="the checkpoint (default: generated)")
    ap.add_argument("--updates", type=int, default=3, help="timed updates after one warm-up")
    ap.add_argument("--update-timeout", type=int, default=60)
    ap.add_argument("--workdir", default=os.environ.get("GC_WORK") or tempfile.gettempdir())
    ap.add_argument("--summary", metavar="FILE")
    ap.add_argument("--consumer", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.consumer:
        consumer(a.model)
        return 0
    summary = {"size": a.size, "ok": False}
    signal.signal(signal.SIGTERM, lambda n, f: sys.exit("reference_ce: stopped by signal %d" % n))
    try:
        return run(a, summary)
    except Failure as e:
        log("FAILED: %s" % e)
        summary["error"] = str(e)
        return 1
    except Exception as e:  # noqa: BLE001 -- name the cause, with where it came from
        import traceback
        traceback.print_exc()
        log("FAILED: %s: %s" % (type(e).__name__, e))
        summary["error"] = "%s: %s" % (type(e).__name__, e)
        return 1
    finally:
        if a.summary:
            with open(a.summary, "w") as f:
                json.dump(summary, f, indent=1)
        if getattr(a, "generated", None):
            shutil.rmtree(a.generated, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
