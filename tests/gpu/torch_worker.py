#!/usr/bin/env python3
"""A torch inference worker stand-in: holds every tensor of a checkpoint as a torch tensor on
a device (a GPU, or the CPU), takes updates from its engine rank with
ckpt_engine.Receiver.apply_update (device to device from a GPU engine rank's buffers,
opened by CUDA IPC handle) and checks its tensors against the checkpoint's files byte for
byte after each update (outside the update's time).

    torch_worker.py --socket DIR/rank-0.sock --layout MODEL_DIR [--device cuda|cpu]
                    [--updates N] [--verify] [--json FILE]

Prints one JSON line per update (also appended to --json FILE):
    {"update": k, "seconds": s, "bytes": b, "completed": true, "verified": true|null}
Exit status 0 when every update completed (and verified, with --verify), else 1.
"""
import argparse
import glob
import json
import os
import struct
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "python"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from ckpt_engine import Receiver  # noqa: E402
from ckpt_engine.receiver import torch_dtype  # noqa: E402


def read_layout(model_dir):
    """{name: (file, dtype, shape, begin, end)} from the safetensors headers."""
    out = {}
    files = sorted(glob.glob(os.path.join(model_dir, "*.safetensors")))
    if not files:
        raise SystemExit("torch_worker: no *.safetensors in %s" % model_dir)
    for path in files:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        for name, t in header.items():
            if name == "__metadata__":
                continue
            b, e = t["data_offsets"]
            out[name] = (path, t["dtype"], tuple(t["shape"]), 8 + n + b, 8 + n + e)
    return out


def verify(params, layout, device):
    """True when every tensor holds exactly the file's bytes (compared on the device)."""
    for name, (path, _, _, b, e) in layout.items():
        want = torch.from_numpy(np.fromfile(path, dtype=np.uint8, count=e - b, offset=b))
        got = params[name].reshape(-1).view(torch.uint8)
        if got.numel() != want.numel() or not torch.equal(got, want.to(device)):
            print("torch_worker: tensor %s differs from %s" % (name, path), file=sys.stderr)
            return False
    return True


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--socket", required=True)
    ap.add_argument("--layout", required=True, help="checkpoint directory (safetensors)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--updates", type=int, default=1)
    ap.add_argument("--verify", action="store_true", help="compare bytes after each update")
    ap.add_argument("--json", help="append each update's line to this file")
    ap.add_argument("--timeout-ms", type=int, default=120000, help="wait for the engine")
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device.index or 0)
    layout = read_layout(args.layout)
    params = {name: torch.zeros(shape, dtype=torch_dtype(torch, dt), device=device)
              for name, (_, dt, shape, _, _) in layout.items()}
    total = sum(t.numel() * t.element_size() for t in params.values())
    print("torch_worker: %d tensors, %d bytes on %s" % (len(params), total, device), flush=True)
    ok = True
    with Receiver.connect(args.socket, args.timeout_ms) as rx:
        for k in range(args.updates):
            res = rx.apply_update(params, timeout_ms=args.timeout_ms)
            if device.type == "cuda":
                torch.cuda.synchronize()
            checked = verify(params, layout, device) if args.verify and res.completed else None
            line = {"update": k + 1, "seconds": round(res.seconds, 6), "bytes": total,
                    "completed": res.completed, "verified": checked, "reason": res.reason}
            print(json.dumps(line), flush=True)
            if args.json:
                with open(args.json, "a") as f:
                    f.write(json.dumps(line) + "\n")
            ok = ok and res.completed and checked is not False
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
