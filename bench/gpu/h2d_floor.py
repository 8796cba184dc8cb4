"""The floor of a host-to-device update: pinned host memory copied into a preallocated
device tensor with torch (cudaMemcpyAsync), timed with CUDA events, best of N.

    python3 bench/gpu/h2d_floor.py [--size 1GiB] [--repeats 5] [--json FILE]

prints `h2d_floor_gbs=<float>` (GB/s, 1e9 bytes per second, as ckpt-engine reports), and
every repeat's figure on a second line. run_update.py imports measure() to take the floor
in the same run as the update, before and after it."""
import argparse
import json
import re
import sys

UNITS = {"": 1, "B": 1, "K": 1 << 10, "KIB": 1 << 10, "M": 1 << 20, "MIB": 1 << 20,
         "G": 1 << 30, "GIB": 1 << 30, "T": 1 << 40, "TIB": 1 << 40,
         "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}


def parse_size(text):
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    if not m or m.group(2).upper() not in UNITS:
        raise argparse.ArgumentTypeError("not a size: %r (e.g. 1GiB, 512MiB)" % text)
    return int(float(m.group(1)) * UNITS[m.group(2).upper()])


def measure(nbytes=1 << 30, repeats=5, device="cuda"):
    """GB/s of each of `repeats` pinned host -> device copies of nbytes (after one warm-up);
    the memory is freed before returning, so an update that follows has it back."""
    import torch
    if not torch.cuda.is_available():
        raise RuntimeError("h2d_floor: torch.cuda.is_available() is False")
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    src.fill_(0x5A)  # every page touched before timing
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    stream = torch.cuda.Stream(device=device)
    results = []
    with torch.cuda.stream(stream):
        dst.copy_(src, non_blocking=True)  # warm-up: the first copy pays for mappings
        stream.synchronize()
        for _ in range(repeats):
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record(stream)
            dst.copy_(src, non_blocking=True)
            end.record(stream)
            end.synchronize()
            ms = start.elapsed_time(end)
            results.append(nbytes / (ms / 1e3) / 1e9)
    del src, dst
    torch.cuda.empty_cache()
    return results


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=parse_size, default=1 << 30)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    a = ap.parse_args()
    try:
        res = measure(a.size, a.repeats)
    except Exception as e:  # noqa: BLE001 -- name the cause, not a traceback
        print("h2d_floor: FAILED: %s: %s" % (type(e).__name__, e), file=sys.stderr)
        return 1
    best = max(res)
    print("h2d_floor_gbs=%.3f" % best)
    print("h2d_floor: %d x %d bytes pinned -> device: %s GB/s" %
          (len(res), a.size, ", ".join("%.2f" % r for r in res)))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"h2d_floor_gbs": best, "all_gbs": res, "bytes": a.size}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
