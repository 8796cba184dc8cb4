"""The trainer and the save-and-reload workers of bench/peers.py, each its own process,
driven by JSON lines on stdin and answering JSON lines on stdout. Times are
time.monotonic() (CLOCK_MONOTONIC, one clock for every process of the host), so the driver
subtracts the trainer's start from the last worker's end.

  python3 peers_roles.py trainer CHECKPOINT   holds every tensor in its memory, then:
      {"op": "publish", "name", "dir", "step", "pull"}  ckpt_engine.publish, until registered
      {"op": "save", "path", "fsync"}           a safetensors file, written with writev
      {"op": "mutate", "byte"}                  a training step: every byte XORed (untimed)
  python3 peers_roles.py reader CHECKPOINT    a worker holding its tensors (shapes from
                                              CHECKPOINT, zeroed and resident), then:
      {"op": "load", "path"}                    parses the file's header, reads every
                                                tensor straight into its own buffer; then
                                                prints its checksums and scrubs the buffers
"""
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.join(os.path.dirname(HERE), "python")]

import numpy as np  # noqa: E402

import peers_lib as pl  # noqa: E402


def say(obj):
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def runs(items):
    """Groups [(file, offset, nbytes, array)] into runs of consecutive bytes of one file."""
    out = []
    for fn, off, n, a in sorted(items, key=lambda x: (x[0], x[1])):
        if out and out[-1][0] == fn and out[-1][1] + out[-1][2] == off:
            out[-1][2] += n
            out[-1][3].append(a)
        else:
            out.append([fn, off, n, [a]])
    return out


def load_into(items):
    for fn, off, n, arrays in runs(items):
        fd = os.open(fn, os.O_RDONLY)
        try:
            if pl.readv_into(fd, arrays, off) != n:
                raise IOError("%s: short read at %d" % (fn, off))
        finally:
            os.close(fd)


def trainer(path):
    lay = pl.layout(path)
    tensors = pl.tensor_buffers(lay)
    load_into([(fn, off, n, tensors[name]) for name, _, _, n, fn, off in lay])
    dtypes = {name: dt for name, dt, _, _, _, _ in lay}
    say({"ready": True, "tensors": len(lay), "bytes": sum(x[3] for x in lay)})
    for line in sys.stdin:
        req = json.loads(line)
        try:
            if req["op"] == "quit":
                return
            if req["op"] == "publish":
                from ckpt_engine import publish
                marks = _watch_publish()
                t0 = time.monotonic()
                res = publish(req["name"], {n: (a, dtypes[n]) for n, a in tensors.items()},
                              socket_dir=req["dir"], step=req["step"], wait=True,
                              timeout_s=req.get("timeout_s", 600), pull=req.get("pull", False))
                t1 = time.monotonic()
                say({"t0": t0, "t1": t1, "registered": res.registered, "version": res.version,
                     "text": res.text, "stages": _publish_stages(t0, marks, t1)})
            elif req["op"] == "mutate":
                # A training step, untimed: every byte changes (x ^ b, b != 0), so each
                # update must deliver every byte again to verify.
                for a in tensors.values():
                    v = a.reshape(-1).view(np.uint8)
                    np.bitwise_xor(v, np.uint8(req["byte"]), out=v)
                say({"checksums": {n: "%016x" % pl.checksum(a) for n, a in tensors.items()}})
            elif req["op"] == "save":
                t0 = time.monotonic()
                save(req["path"], lay, tensors, req["fsync"])
                say({"t0": t0, "t1": time.monotonic()})
            else:
                say({"error": "unknown op %r" % req["op"]})
        except Exception as e:  # the driver reports the row as failed with this text
            say({"error": "%s: %s" % (type(e).__name__, e)})


def _watch_publish():
    """Where publish() spends its time, without changing it: the library it calls is
    wrapped so that the ends of ckpt_publish_begin (memfd made and its pages allocated)
    and the start of ckpt_publish_send (seal, send, the engine's checks, checksums and
    registration) are noted; the copy of the tensors lies between them."""
    mod = sys.modules["ckpt_engine.publish"]
    marks = {}
    if not hasattr(mod, "_bench_lib"):
        mod._bench_lib = mod.lib
    real = mod._bench_lib()

    class Timed:
        def __getattr__(self, name):
            fn = getattr(real, name)
            if name not in ("ckpt_publish_begin", "ckpt_publish_begin_pull", "ckpt_publish_send"):
                return fn

            def call(*a):
                marks[name + ".start"] = time.monotonic()
                rc = fn(*a)
                marks[name + ".end"] = time.monotonic()
                return rc
            return call
    mod.lib = lambda: Timed()
    return marks


def _publish_stages(t0, m, t1):
    """memfd: the layout and (memfd mode) the memfd with its pages; copy: the trainer's
    copy into it (memfd mode; with pull, naming the sources); send+register: the rest, in
    pull mode the engine's read of the trainer's memory included."""
    begin = "ckpt_publish_begin_pull" if "ckpt_publish_begin_pull.end" in m else "ckpt_publish_begin"
    try:
        return {"memfd": m[begin + ".end"] - t0,
                "copy": m["ckpt_publish_send.start"] - m[begin + ".end"],
                "send+register": t1 - m["ckpt_publish_send.start"]}
    except KeyError:
        return {}


def save(path, lay, tensors, fsync):
    """What a careful trainer does: header, then every tensor's bytes handed to the kernel
    straight from its memory (writev, no serialising copy), fsync when the file must
    survive a crash, written under a temporary name and renamed so that no reader ever
    sees half a checkpoint."""
    header, off = {}, 0
    for name, dt, shape, n, _, _ in lay:
        header[name] = {"dtype": dt, "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    hj = json.dumps(header, separators=(",", ":")).encode()
    hj += b" " * (-len(hj) % 8)
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        views = [memoryview(len(hj).to_bytes(8, "little") + hj)]
        views += [memoryview(tensors[name].reshape(-1).view(np.uint8))
                  for name, _, _, n, _, _ in lay if n]
        for i in range(0, len(views), 512):
            batch = views[i:i + 512]
            want, done = sum(len(v) for v in batch), 0
            while done < want:  # writev may write less than asked for
                done += os.writev(fd, _skip(batch, done))
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, path)
    if fsync:
        dfd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
        os.fsync(dfd)
        os.close(dfd)


def _skip(views, n):
    out = []
    for v in views:
        if n >= len(v):
            n -= len(v)
            continue
        out.append(v[n:])
        n = 0
    return out


def reader(path):
    lay = pl.layout(path)
    mine = pl.tensor_buffers(lay)
    say({"ready": True, "tensors": len(lay)})
    for line in sys.stdin:
        req = json.loads(line)
        if req["op"] == "quit":
            return
        try:
            t0 = time.monotonic()
            items = []
            for fn in pl.files_of(req["path"]):
                with open(fn, "rb") as f:
                    tensors, start = pl.read_header(f)
                for name, dt, shape, b, e in tensors:
                    dst = mine.get(name)
                    if dst is None or dst.nbytes != e - b or tuple(shape) != dst.shape:
                        raise ValueError("%s: tensor %s does not match this worker's model"
                                         % (fn, name))
                    items.append((fn, start + b, e - b, dst))
            if len(items) != len(mine):
                raise ValueError("%s holds %d of this worker's %d tensors"
                                 % (req["path"], len(items), len(mine)))
            load_into(items)
            t1 = time.monotonic()
            say({"t0": t0, "t1": t1})
        except Exception as e:
            say({"error": "%s: %s" % (type(e).__name__, e)})
            continue
        # Untimed: what this worker holds, then scrubbed so the next load must deliver it.
        say({"checksums": {n: "%016x" % pl.checksum(a) for n, a in mine.items()}})
        for a in mine.values():
            a.reshape(-1).view(np.uint8).fill(0xa5)


if __name__ == "__main__":
    {"trainer": trainer, "reader": reader}[sys.argv[1]](sys.argv[2])
