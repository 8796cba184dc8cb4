"""The naive weight sync many RL frameworks ship, for bench/peers.py: rank 0 (the trainer)
broadcasts every tensor, one torch.distributed.broadcast per tensor, gloo backend on CPU,
into each worker's own tensors.

  RANK=r WORLD_SIZE=N+1 MASTER_ADDR=127.0.0.1 MASTER_PORT=P python peers_torch.py CKPT REPEAT

Rank 0 reads the checkpoint into its tensors before the clock; workers allocate and zero
theirs (resident, as a serving worker's are). Per repeat, timed from a barrier to the last
rank done; then, untimed, every worker's tensors are checksummed (XXH3-64, libckpt) and
compared with the trainer's, and scrubbed. Rank 0 prints one JSON line per repeat; exit
status 0 when every repeat verified."""
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import peers_lib as pl  # noqa: E402

DTYPES = {"BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16,
          "F16": torch.float16, "BF16": torch.bfloat16, "I32": torch.int32,
          "F32": torch.float32, "I64": torch.int64, "F64": torch.float64}


def main():
    path, repeat = sys.argv[1], int(sys.argv[2])
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    lay = pl.layout(path)
    tensors = []
    for name, dt, shape, nbytes, fn, off in lay:
        # Real dtypes and shapes where torch has them; other dtypes as raw bytes.
        t = torch.zeros(shape, dtype=DTYPES[dt]) if dt in DTYPES else torch.zeros(nbytes, dtype=torch.uint8)
        if rank == 0 and nbytes:
            with open(fn, "rb", buffering=0) as f:
                f.seek(off)
                if f.readinto(memoryview(t.reshape(-1).view(torch.uint8).numpy())) != nbytes:
                    raise IOError("%s: tensor %s is cut short" % (fn, name))
        tensors.append(t)
    total = sum(x[3] for x in lay)
    want = torch.zeros(len(lay), dtype=torch.int64)
    if rank == 0:
        for i, t in enumerate(tensors):
            want[i] = _signed(pl.checksum_at(t.data_ptr(), t.numel() * t.element_size()))
    dist.broadcast(want, 0)
    ok = True
    for r in range(repeat):
        dist.barrier()
        t0 = time.monotonic()
        for t in tensors:
            dist.broadcast(t, 0)
        end = torch.tensor([time.monotonic()], dtype=torch.float64)
        dist.all_reduce(end, op=dist.ReduceOp.MAX)
        bad = torch.zeros(1, dtype=torch.int64)
        if rank != 0:
            for i, t in enumerate(tensors):
                if _signed(pl.checksum_at(t.data_ptr(), t.numel() * t.element_size())) != int(want[i]):
                    bad += 1
                t.reshape(-1).view(torch.uint8).fill_(0xa5)
        dist.all_reduce(bad, op=dist.ReduceOp.SUM)
        if rank == 0:
            print(json.dumps({"mode": "torch", "repeat": r, "seconds": float(end[0]) - t0,
                              "bytes": total, "tensors": len(lay), "workers": world - 1,
                              "verified": int(bad[0]) == 0, "mismatches": int(bad[0]),
                              "torch": torch.__version__}), flush=True)
        ok = ok and int(bad[0]) == 0
    dist.destroy_process_group()
    sys.exit(0 if ok else 1)


def _signed(u):
    return u - (1 << 64) if u >= 1 << 63 else u


if __name__ == "__main__":
    main()
