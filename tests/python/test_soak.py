"""Soak: 200 consecutive updates of a 64 MiB checkpoint (direct and staged alternating) keep
the memory and open files of every engine rank and every worker flat, and the workers'
bytes are right at the end."""
import os
import time

from mpijob import Deployment, InteractiveServe, assert_worker_equals, gen

UPDATES = 200
WARMUP = 20                 # the first updates map pools, size arrays, fault pages in
RSS_SLACK = 8 << 20         # tolerance; leaking 64 KiB per update would exceed it


def sample(pid):
    """(resident bytes, anonymous resident bytes, open fds, mappings) of a live process.
    Open fds are the fewest seen over 10 looks 50 ms apart: rank 0 answers an update while
    another rank may still be closing what the update opened (a direct update's view of
    the other ranks' pools), which is not a leak; a leak stays in every look."""
    with open("/proc/%d/status" % pid) as f:
        st = {l.split(":")[0]: int(l.split()[1]) * 1024 for l in f
              if l.startswith(("VmRSS:", "RssAnon:"))}
    with open("/proc/%d/maps" % pid) as f:
        nmaps = sum(1 for _ in f)
    fds = []
    for _ in range(10):
        fds.append(len(os.listdir("/proc/%d/fd" % pid)))
        time.sleep(0.05)
    return st["VmRSS"], st["RssAnon"], min(fds), nmaps


def test_200_updates_keep_rss_and_fds_flat(tmp_path):
    model = gen(tmp_path, size="64MiB", layers=4, shards=2)
    dep = Deployment(tmp_path, 2)
    for r in range(2):
        # --updates: the dump is written after the last update only (not 200 x 64 MiB)
        dep.start_worker(r, ["--layout", model], updates=UPDATES)
    srv = InteractiveServe(dep)
    try:
        assert srv.command("register m %s" % model, 120)["ok"]
        procs = {"rank %d" % i: pid for i, pid in enumerate(srv.rank_pids())}
        procs.update({"worker %d" % r: p.pid for r, p in dep.workers.items()})
        assert len(procs) == 4, procs
        # Samples after a direct and after a staged update, early and late: a worker maps
        # the owners' pools in one mode and the 2 x 256 MiB IPC buffers in the other, so
        # only samples of the same mode compare.
        early, late = {}, {}
        for i in range(UPDATES):
            direct = i % 2
            res = srv.command("update m bucket=16MiB direct=%d" % direct, 60)
            assert res["ok"], (i, res)
            if WARMUP <= i < WARMUP + 2:
                early[direct] = {name: sample(pid) for name, pid in procs.items()}
            if UPDATES - 3 <= i < UPDATES - 1:  # before the last: the workers exit after it
                late[direct] = {name: sample(pid) for name, pid in procs.items()}
        for direct in (0, 1):
            for name in procs:
                (rss0, anon0, fds0, maps0) = early[direct][name]
                (rss1, anon1, fds1, maps1) = late[direct][name]
                what = "%s (%s updates)" % (name, "direct" if direct else "staged")
                assert fds1 == fds0, "%s: %d open fds late, %d early" % (what, fds1, fds0)
                assert maps1 <= maps0 + 2, "%s: %d mappings late, %d early" % (what, maps1,
                                                                               maps0)
                for label, a, b in (("resident", rss0, rss1), ("anonymous", anon0, anon1)):
                    assert b - a <= RSS_SLACK, "%s: %s memory grew %.1f MiB over %d " \
                        "updates" % (what, label, (b - a) / 2**20, UPDATES - WARMUP - 3)
                print("soak: %-28s resident %+.2f MiB, anonymous %+.2f MiB, fds %d -> %d, "
                      "mappings %d -> %d" % (what, (rss1 - rss0) / 2**20,
                                             (anon1 - anon0) / 2**20, fds0, fds1, maps0, maps1))
        dep.wait_workers(timeout=120)
        for r in range(2):
            assert dep.workers[r].returncode == 0, dep.worker_log(r)
            assert_worker_equals(dep, r, model)
    finally:
        srv.close()
        dep.stop()
