"""P2P update between two MPI jobs on this machine: a serving deployment exports its
metas, a joining deployment pulls over UCX (shared memory or TCP) and updates its own
workers; the serving workers receive nothing."""
import os
import re
import signal
import time

import pytest

import mpijob
from mpijob import WORKER, Deployment, InteractiveServe, gen, read_checkpoint, wait_log

pytestmark = pytest.mark.skipif(not os.path.exists(WORKER), reason="ckpt-worker not built")


def same(dep, r, model):
    got, want = read_checkpoint(dep.worker_dump(r)), read_checkpoint(model)
    assert set(got) == set(want)
    for name, (_, _, data) in want.items():
        assert got[name][2] == data, "joining worker %d: %s" % (r, name)


@pytest.fixture
def serving(tmp_path, monkeypatch, request):
    # "TLS" or "TLS|off": the serving deployment with --ucx-pools off (memfd pools).
    tls, _, pools = getattr(request, "param", "shm,self").partition("|")
    monkeypatch.setattr(mpijob, "MPI_ENV", dict(mpijob.MPI_ENV, UCX_TLS=tls))
    model = gen(tmp_path, size="8MiB", layers=2, shards=2)
    sdir = tmp_path / "serving"
    sdir.mkdir()
    sdep = Deployment(sdir, 2)
    for r in range(2):
        sdep.start_worker(r, ["--layout", model])
    srv = InteractiveServe(sdep, ["--ucx-pools", pools] if pools else None)
    assert srv.command("register m %s" % model)["ok"]
    metas = str(tmp_path / "metas.json")
    assert srv.command("export m %s" % metas)["ok"]
    jdir = tmp_path / "joining"
    jdir.mkdir()
    jdep = Deployment(jdir, 2)
    yield model, metas, srv, sdep, jdep
    srv.close()
    sdep.stop()
    jdep.stop()


def serving_workers_untouched(sdep):
    for r in range(2):
        assert "update" not in sdep.worker_log(r), sdep.worker_log(r)


def memfd_pools(pids):
    """How many of the store's own memfd pools the processes map."""
    n = 0
    for pid in pids:
        with open("/proc/%d/maps" % pid) as f:
            n += sum("memfd:ckpt-pool" in line for line in f)
    return n


@pytest.mark.parametrize("serving", ["shm,self", "shm,self|off", "tcp,self"], indirect=True)
def test_p2p_update_pulls_and_verifies(serving, request):
    model, metas, srv, sdep, jdep = serving
    # Over shared memory the pools come from UCX (joiners copy straight out of them);
    # with --ucx-pools off, or without a shared-memory transport, they are memfds.
    pids = srv.rank_pids()
    assert len(pids) == 2, pids
    memfds = memfd_pools(pids)
    if request.node.callspec.params["serving"] == "shm,self":
        assert memfds == 0, memfds
    else:
        assert memfds >= 2, memfds
    for r in range(2):
        jdep.start_worker(r, ["--layout", model, "--verify"], updates=1)
    p, res = jdep.serve(["p2p-update %s bucket=1MiB verify=1" % metas], check=True)
    upd = [r for r in res if r["command"] == "update"][0]
    assert upd["ok"] and upd["p2p"] == 1, upd
    assert upd["pull_bytes"] == sum(len(d) for _, _, d in read_checkpoint(model).values())
    jdep.wait_workers()
    for r in range(2):
        same(jdep, r, model)
    serving_workers_untouched(sdep)
    # The serving deployment is still up and exports as before.
    assert srv.command("export m %s.again" % metas)["ok"]


def test_p2p_joiners_pull_only_the_rows_they_need(serving):
    """Both joining workers hold TP rank 0 of 2 and declare it (--declare-need): the
    joiners pull only those rows of each sharded tensor (one UCX get per range) and the
    whole of the others: pull_bytes is exactly what the workers need, and each worker
    holds exactly its rows."""
    model, metas, srv, sdep, jdep = serving
    want = read_checkpoint(model)
    for r in range(2):
        jdep.start_worker(r, ["--layout", model, "--tp-rank", "0", "--tp-size", "2",
                              "--declare-need"], updates=1)
    jsrv = InteractiveServe(jdep)
    try:
        for r in range(2):
            wait_log(jdep, r, r"declared the need of \d+ tensors")
        upd = jsrv.command("p2p-update %s bucket=1MiB" % metas)
    finally:
        jsrv.close()
    assert upd["ok"] and upd["p2p"] == 1, upd
    rows = {n: len(d) // 2 if len(shape) >= 2 and shape[0] % 2 == 0 else len(d)
            for n, (_, shape, d) in want.items()}
    assert sum(rows.values()) < 0.7 * sum(len(d) for _, _, d in want.values())
    assert upd["pull_bytes"] == upd["bytes"] == sum(rows.values()), upd
    jdep.wait_workers()
    for r in range(2):
        got = read_checkpoint(jdep.worker_dump(r))
        for n, (_, shape, d) in want.items():
            assert got[n][2] == d[:rows[n]], (r, n)
    serving_workers_untouched(sdep)


def test_p2p_refuses_unregistered(serving):
    model, metas, srv, sdep, jdep = serving
    assert srv.command("unregister m")["ok"]
    for r in range(2):
        jdep.start_worker(r, ["--layout", model])
    p, res = jdep.serve(["p2p-update %s timeout=5000" % metas])
    upd = [r for r in res if r["command"] == "update"][0]
    assert not upd["ok"] and "unregistered" in upd["reason"], upd
    time.sleep(0.3)
    for r in range(2):  # refused before any byte reached a worker
        assert "update" not in jdep.worker_log(r), jdep.worker_log(r)


def test_p2p_refuses_other_version(serving):
    model, metas, srv, sdep, jdep = serving
    assert srv.command("unregister m")["ok"]
    assert srv.command("register m %s" % model)["ok"]  # a new version
    assert srv.command("export m %s.new" % metas)["ok"]
    for r in range(2):
        jdep.start_worker(r, ["--layout", model])
    p, res = jdep.serve(["p2p-update %s timeout=5000" % metas])
    upd = [r for r in res if r["command"] == "update"][0]
    assert not upd["ok"] and "another version" in upd["reason"], upd


def test_p2p_serving_rank_dead(serving):
    model, metas, srv, sdep, jdep = serving
    pids = srv.rank_pids()
    os.kill(pids[1], signal.SIGKILL)
    srv.proc.wait(timeout=30)
    for r in range(2):
        jdep.start_worker(r, ["--layout", model])
    t0 = time.monotonic()
    p, res = jdep.serve(["p2p-update %s timeout=3000" % metas], timeout=90)
    upd = [r for r in res if r["command"] == "update"][0]
    assert not upd["ok"] and "serving rank" in upd["reason"], upd
    assert time.monotonic() - t0 < 60


def test_bench_p2p_runs(tmp_path):
    """The benchmark itself (tiny): every row present, every update ok (exit 0)."""
    import subprocess
    p = subprocess.run([mpijob.ENGINE, "bench", "p2p", "--size", "8MiB", "--bucket", "1MiB",
                        "--repeat", "2"],
                       capture_output=True, text=True, timeout=240, env=mpijob.MPI_ENV)
    assert p.returncode == 0, p.stdout + p.stderr
    for row in ("P2P pull phase", "ucx_perftest", "same, beside 2 copy loops", "P2P update (joining",
                "broadcast update, direct", "broadcast update, staged"):
        assert row in p.stdout, p.stdout
    assert "median of 2 updates" in p.stdout, p.stdout


def process_gone(pid):
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(") ", 1)[1][0] in "ZX"  # exited, not yet reaped
    except FileNotFoundError:
        return True


@pytest.mark.parametrize("serving", ["shm,self", "tcp,self"], indirect=True)
def test_p2p_serving_rank_dies_mid_transfer(serving, tmp_path, monkeypatch):
    """The serving job dies between two buckets of a pull: the joiner's update fails
    naming a dead serving rank and its process, its workers learn that the update did not
    complete, and the joining deployment takes the next command (a full update). The
    death is placed by the CKPT_TEST_P2P_PAUSE hook (src/engine/p2p.c): the joining rank
    that pulled its first bucket waits for a file while the serving ranks are killed.
    Over shared memory the transport cannot see a dead peer at all; the pull names it
    anyway (the peer's pidfd, src/comm/ucx_addr.c)."""
    model, metas, srv, sdep, jdep = serving
    release = str(tmp_path / "release")
    monkeypatch.setattr(mpijob, "MPI_ENV", dict(mpijob.MPI_ENV,
                                                CKPT_TEST_P2P_PAUSE="1:" + release))
    for r in range(2):
        jdep.start_worker(r, ["--layout", model])
    jsrv = InteractiveServe(jdep)
    try:
        # 8 MiB in 1 MiB buckets: several buckets per joining rank after the pause.
        jsrv.send("p2p-update %s bucket=1MiB timeout=5000" % metas)
        deadline = time.monotonic() + 60
        while not (os.path.exists(release + ".paused") and
                   "paused after bucket 1" in open(release + ".paused").read()):
            assert time.monotonic() < deadline, "no joining rank paused after its first bucket"
            assert jsrv.proc.poll() is None, jsrv.proc.stderr.read()
            time.sleep(0.05)
        pids = srv.rank_pids()
        assert len(pids) == 2, pids
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        srv.proc.wait(timeout=30)
        for pid in pids:  # gone, not only signalled
            assert process_gone(pid), pid
        open(release, "w").close()
        t0 = time.monotonic()
        res = jsrv.result(timeout=90)
        assert not res["ok"], res
        m = re.search(r"serving rank (\d+): .*its process \(pid (\d+)\) exited", res["reason"])
        assert m and int(m.group(1)) in (0, 1) and int(m.group(2)) in pids, res
        assert time.monotonic() - t0 < 5, "the dead rank was not noticed at once"
        for r in range(2):  # the joining workers know their update did not complete
            wait_log(jdep, r, r"update \d+ of 'm' version \d+: (aborted|incomplete)")
            assert not re.search(r": complete", jdep.worker_log(r)), jdep.worker_log(r)
        # Still up: the next command runs, and the workers get every byte of it.
        assert jsrv.command("register m %s" % model)["ok"]
        upd = jsrv.command("update m bucket=1MiB timeout=10000", timeout=90)
        assert upd["ok"], upd
        for r in range(2):
            v = wait_log(jdep, r, r"update \d+ of 'm' version (\d+): complete").group(1)
            wait_log(jdep, r, r"state: consistent at version %s" % v)  # printed after the dump
            same(jdep, r, model)
    finally:
        jsrv.close()
