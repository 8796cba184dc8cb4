"""The table of a GPU check, from the JSON the other scripts wrote (any may be missing:
its rows then say so).

    python3 bench/gpu/table.py --floor F.json --update U8.json --reference R8.json
                               [--update32 U32.json] [--md FILE]

| what | value | ratio |: the H2D floor (pinned host -> device, torch, best of 5), our
update's H2D GB/s (stage_bytes/stage_s when the result has them, else the update's GB/s)
and its ratio to the floor, the update time, GB/s per worker, the reference's time
(checkpoint-engine 0.4.2) and our speedup over it (reference time / our time); the same
for the 32 GiB update published from memory. Printed, and written to --md."""
import argparse
import json
import sys


def load(path):
    if not path:
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def cell(text):
    """One table cell: a failure's text on one line, no column separators."""
    return " / ".join(l.strip() for l in str(text).splitlines() if l.strip()).replace("|", "/")


def fmt(v, unit, digits=2):
    return "%.*f %s" % (digits, v, unit) if isinstance(v, (int, float)) else "n/a"


def ratio(a, b):
    return "%.2f" % (a / b) if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b else ""


def of_floor(a, b):
    r = ratio(a, b)
    return r + " of the floor" if r else ""


def gib(n):
    return "%.1f GiB" % (n / 2**30) if isinstance(n, (int, float)) else "?"


def rows_for(u, floor, default):
    label = default
    if u and u.get("size"):
        label = "%s %s" % (gib(u["size"]).replace(".0 GiB", " GiB"),
                           "published from memory" if u.get("mode") == "memory" else "from disk")
    if u is None:
        return [("ckpt-engine %s" % label, "not run", "")]
    if not u.get("ok"):
        errs = "; ".join(u.get("errors", [])) or u.get("error", "failed")
        rows = [("ckpt-engine %s" % label, "FAILED: %s" % errs[:300], "")]
        if u.get("update_s") is None:
            return rows
    else:
        rows = []
    floors = [f for f in (u.get("floor_before_gbs"), u.get("floor_after_gbs")) if f]
    fl = max(floors) if floors else floor
    size = gib(u.get("bytes"))
    h2d_how = u.get("h2d_source", "")
    rows += [
        ("%s: H2D GB/s (%s)" % (label, h2d_how), fmt(u.get("h2d_gbs"), "GB/s"),
         of_floor(u.get("h2d_gbs"), fl)),
        ("%s: update time, %s (median of the last 2 of %d)" % (label, size,
                                                              len(u.get("update_s_all", []))),
         fmt(u.get("update_s"), "s", 3), ""),
        ("%s: GB/s per worker" % label, fmt(u.get("per_worker_gbps"), "GB/s"),
         of_floor(u.get("per_worker_gbps"), fl)),
    ]
    v = u.get("verified")
    rows.append(("%s: worker's check of the bytes" % label,
                 "every tensor equal to the files'" if v is True else
                 "NOT verified" if v is False else (v or "n/a"), ""))
    if floors:
        rows.append(("%s: H2D floor in the same run (before, after)" % label,
                     " / ".join(fmt(f, "GB/s") for f in (u.get("floor_before_gbs"),
                                                         u.get("floor_after_gbs"))), ""))
    if u.get("publish_s"):
        rows.append(("%s: publish (tensors filled in %.2f s before)" % (label, u.get("fill_s", 0)),
                     fmt(u["publish_s"], "s", 2), ""))
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--floor")
    ap.add_argument("--update")
    ap.add_argument("--reference")
    ap.add_argument("--update32")
    ap.add_argument("--md", metavar="FILE")
    a = ap.parse_args()
    fl, u8, ref, u32 = load(a.floor), load(a.update), load(a.reference), load(a.update32)
    floor = fl.get("h2d_floor_gbs") if fl else None
    rows = [("H2D floor: pinned host -> device, torch, 1 GiB, best of 5", fmt(floor, "GB/s"),
             "1.00" if floor else "")]
    rows += rows_for(u8, floor, "8 GiB from disk")
    if ref is None:
        rows.append(("checkpoint-engine 0.4.2: update time", "not run", ""))
    elif not ref.get("ok"):
        rows.append(("checkpoint-engine 0.4.2: update time",
                     "FAILED: %s" % ref.get("error", "?")[:200], ""))
    else:
        ours = u8.get("update_s") if u8 else None
        rows.append(("checkpoint-engine 0.4.2: update time, %s (median of %d)" %
                     (gib(ref.get("bytes")), len(ref.get("update_s_all", []))),
                     fmt(ref.get("update_s"), "s", 3),
                     ("speedup %s" % ratio(ref.get("update_s"), ours)) if ours else ""))
        rows.append(("checkpoint-engine 0.4.2: GB/s", fmt(ref.get("update_gbs"), "GB/s"),
                     of_floor(ref.get("update_gbs"), floor)))
    rows += rows_for(u32, floor, "32 GiB published from memory")

    lines = ["| what | value | ratio |", "| --- | --- | --- |"]
    lines += ["| %s | %s | %s |" % tuple(cell(c) for c in r) for r in rows]
    text = "\n".join(lines)
    print(text)
    if a.md:
        with open(a.md, "w") as f:
            f.write("# GPU check\n\n" + text + "\n")
        print("table: written to %s" % a.md)
    return 0 if u8 and u8.get("ok") and ref and ref.get("ok") and floor else 1


if __name__ == "__main__":
    sys.exit(main())
