"""Update time on one host vs two hosts (network namespaces joined by a bridge, MPI over
TCP between them; tests/multihost/hosts.py), same checkpoint, same number of workers: the
figures a cost model of multi-host updates is checked against. Needs root.

  python3 bench/multihost.py [--size 64MiB] [--repeat 3] [--rate RATE]

--rate (a tc rate, e.g. 1gbit) shapes each host's link, so that the link and not the
cores bounds what crosses between hosts, as on a cluster: the model then gets the shaped
MPI_Bcast floor as --inter and the unshaped one (measured first, in the same deployment)
as --tcp-core, the core time TCP costs.

Rows (median of --repeat updates after one warm-up; each row a fresh deployment):
  1 host x 2 ranks, direct   the default on one host: workers read the owners' pools
  1 host x 2 ranks, staged   direct=0: through the host's IPC buffers, no network
  2 hosts x 1 rank           the other host's bytes cross the veth/bridge link (MPI_Ibcast)
  2 hosts x 1 rank, routed   each worker holds and declares half the layers (as PP=2
                             stages: --need-glob), so a bucket goes only to the host that
                             needs it (predicted: the need-routed way with --pp 2)
  2 hosts x 1 rank, TP=2     one TP=2 instance across the hosts: each worker declares its
                             rows (ckpt-worker --declare-need) and the engine cuts every
                             sharded tensor, so a host receives only its rows (predicted:
                             the need-routed way with --tp 2)
Rows on 2 hosts also print their time as a ratio of the full broadcast row's.
The MPI_Bcast floor (serve's `floors`) of each deployment is printed beside it, and what
the cost model (`ckpt-engine plan`, src/plan/cost.c) predicts for that row from the floors
measured in the same deployment: the copy floor with streaming stores (rank 0 alone, and all
ranks at once), the MPI_Bcast floor between the hosts.
"""
import argparse
import json
import os
import subprocess
import statistics
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests", "multihost"))

import hosts as hostsmod  # noqa: E402
from deploy import Deployment, gen  # noqa: E402
from mpijob import ENGINE  # noqa: E402

# Worker r of the routed row holds pipeline stage r of a PP=2 split of gen's 4 layers.
STAGES = [["model.embed_tokens.*", "*layers.[01].*"],
          ["*layers.[23].*", "model.norm.*", "lm_head.*"]]
ROWS = [
    # label, hosts used, ranks per host, extra update options, PP stages, TP of the workers
    ("1 host x 2 ranks, direct", [0], 2, "", 1, 1),
    ("1 host x 2 ranks, staged", [0], 2, " direct=0", 1, 1),
    ("2 hosts x 1 rank", [0, 1], 1, "", 1, 1),
    ("2 hosts x 1 rank, routed", [0, 1], 1, "", 2, 1),
    ("2 hosts x 1 rank, TP=2", [0, 1], 1, "", 1, 2),
]


def worker_args(model, r, pp, tp):
    if pp > 1:
        return ["--layout", model] + [a for g in STAGES[r] for a in ("--need-glob", g)]
    if tp > 1:
        return ["--layout", model, "--tp-rank", str(r), "--tp-size", str(tp), "--declare-need"]
    return ["--layout", model]


def measure(workdir, size="64MiB", repeat=3, timeout=120, rate=None):
    """[(label, median update s, [each update s], result of the last update, floors)]:
    one fresh deployment per row on one set of 2 namespace hosts."""
    workdir = str(workdir)
    model = gen(os.path.join(workdir, "model"), size, shards=2)
    out = []
    with hostsmod.make_hosts(2, workdir) as H:
        for k, (label, hosts, slots, opts, pp, tp) in enumerate(ROWS):
            dep = Deployment(H, hosts, workdir, slots=slots, tag="bench-%d" % k)
            dep.start_workers(lambda r: worker_args(model, r, pp, tp), updates=repeat + 1)
            dep.start()
            try:
                for h in hosts:
                    H.unlimit_rate(h)
                floors = dep.command("floors", timeout=timeout)
                if rate and len(hosts) > 1:
                    for h in hosts:
                        H.limit_rate(h, rate)
                    shaped = dep.command("floors", timeout=timeout)
                    floors = dict(floors, tcp_core_gbps=floors["bcast_gbps"],
                                  bcast_gbps=shaped["bcast_gbps"])
                assert dep.command("register m %s" % model, timeout=timeout)["ok"]
                for r in range(len(hosts) * slots if pp > 1 or tp > 1 else 0):
                    dep.wait_worker_log(r, r"declared the need")
                times = []
                for i in range(repeat + 1):
                    res = dep.command("update m timeout=60000" + opts, timeout=timeout)
                    assert res["ok"], res
                    if i:  # the first one maps the buffers and faults the pools in
                        times.append(res["total_s"])
                pred = predict(model, len(hosts), slots, "direct=0" not in opts, floors, pp, tp)
                out.append((label, statistics.median(times), times, res, floors, pred))
                assert dep.close() == 0, dep.stderr()
                dep.wait_workers(timeout=60)
            finally:
                dep.close(timeout=10)
                dep.stop_workers()
    return out


def predict(model, nhosts, slots, direct, floors, pp=1, tp=1, bucket_us=1000):
    """The cost model's figures for a row, from the floors of its deployment; "way" is the
    one the row runs (need-routed when its workers are PP stages or TP shards)."""
    args = [ENGINE, "plan", model, "--json", "--hosts", str(nhosts), "--pp", str(pp),
            "--tp", str(tp),
            "--ranks-per-host", str(slots), "--direct", "on" if direct and nhosts == 1 else "off",
            "--copy", "%.3f" % floors["stream_gbps"],
            "--host-copy", "%.3f" % (floors["stream_concurrent_gbps"] * slots),
            "--bucket-us", str(bucket_us),
            # the namespace hosts share this machine's cores
            "--cores", str(os.cpu_count()), "--one-machine"]
    if nhosts > 1:
        args += ["--inter", "%.3f" % floors["bcast_gbps"]]
    if nhosts > 1 and "tcp_core_gbps" in floors:
        args += ["--tcp-core", "%.3f" % floors["tcp_core_gbps"]]
    out = subprocess.run(args, check=True, capture_output=True, text=True, timeout=60).stdout
    pred = json.loads(out)
    pred["way"] = pred["routed" if pp > 1 or tp > 1 else "full"]
    return pred


def table(rows, size):
    lines = ["update time, %s checkpoint, 2 workers (median of %d updates):"
             % (size, len(rows[0][2]) if rows else 0)]
    base = rows[0][1] if rows else 0
    full = [med for label, med, *_ in rows if label == "2 hosts x 1 rank"]
    for label, med, times, res, floors, pred in rows:
        bcast = floors.get("bcast_gbps", 0) if isinstance(floors, dict) else 0
        p = pred["way"]["total_s"]
        lines.append("  %-26s %7.3f s  predicted %.3f s (measured/predicted %.2f, bound: %s); "
                     "%.2fx of the first row; %.2f GB/s per worker; %d buckets; busiest host "
                     "received %.1f MiB (predicted %.1f); copy floor %.2f GB/s alone, %.2f all "
                     "ranks; MPI_Bcast floor %.2f GB/s"
                     % (label, med, p, med / p if p else 0, pred["way"]["bound"],
                        med / base if base else 0, res["bytes"] / med / 1e9, res["buckets"],
                        res.get("host_bytes_max", 0) / 2**20,
                        pred["way"]["host_in_max"] / 2**20, floors["stream_gbps"],
                        floors["stream_concurrent_gbps"], bcast))
        lines[-1] += ("; phases (ms): gather %.1f, plan %.1f, begin %.1f, pipeline %.1f, "
                      "finish %.1f; predicted fixed %.1f, stage %.1f, broadcast %.1f, reload "
                      "%.1f, cores %.1f"
                      % tuple([res.get(k, 0) * 1e3 for k in
                               ("gather_s", "plan_s", "begin_s", "pipeline_s", "finish_s")] +
                              [pred["way"].get(k, 0) * 1e3 for k in
                               ("overhead_s", "stage_s", "bcast_s", "reload_s", "cpu_s")]))
        if label.startswith("2 hosts") and full and full[0]:
            lines[-1] += "; %.2fx of the full broadcast's time" % (med / full[0])
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="64MiB")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--rate", help="shape each host's link to this tc rate (e.g. 1gbit)")
    a = ap.parse_args()
    try:
        with tempfile.TemporaryDirectory(prefix="ckpt-multihost-") as d:
            print(table(measure(d, a.size, a.repeat, rate=a.rate), a.size))
    except hostsmod.HostsUnavailable as e:
        sys.exit("bench/multihost.py: %s" % e)


if __name__ == "__main__":
    main()
