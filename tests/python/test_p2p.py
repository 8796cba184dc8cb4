"""P2P update between two MPI jobs on this machine: a serving deployment exports its
metas, a joining deployment pulls over UCX (shared memory or TCP) and updates its own
workers; the serving workers receive nothing."""
import os
import signal
import time

import pytest

import mpijob
from mpijob import WORKER, Deployment, InteractiveServe, gen, read_checkpoint

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


@pytest.mark.parametrize("serving", ["tcp,self"], indirect=True)
def test_p2p_serving_rank_dies_mid_transfer(serving, tmp_path):
    """Kill the serving job while the joiner pulls (a larger checkpoint over TCP)."""
    _, _, srv, sdep, jdep = serving
    big = gen(tmp_path, size="256MiB", layers=8, shards=2, name="big")
    assert srv.command("register big %s" % big)["ok"]
    metas = str(tmp_path / "big.json")
    assert srv.command("export big %s" % metas)["ok"]
    for r in range(2):
        jdep.start_worker(r, ["--layout", big])
    jsrv = InteractiveServe(jdep)
    try:
        jsrv.send("p2p-update %s bucket=16MiB timeout=3000" % metas)
        time.sleep(0.25)
        for pid in srv.rank_pids():
            os.kill(pid, signal.SIGKILL)
        t0 = time.monotonic()
        res = jsrv.result(timeout=90)
        if res["ok"]:
            pytest.skip("the pull finished before the serving ranks were killed")
        assert "serving rank" in res["reason"], res
        assert time.monotonic() - t0 < 60
        time.sleep(0.5)
        for r in range(2):  # the joining workers know their update did not complete
            assert "complete" not in jdep.worker_log(r).replace("incomplete", "")
    finally:
        jsrv.close()
