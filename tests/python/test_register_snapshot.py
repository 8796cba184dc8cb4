"""Registration is a snapshot (issue 12, item 3): a checkpoint that changes while the ranks
read it fails the registration, naming the file and what happened to it, on every rank; the
name stays free and the next registration of a complete checkpoint works.

The change happens at a deterministic point: CKPT_TEST_REGISTER_PAUSE_MS makes each rank
pause after opening the files and before reading them, and announce it in its log; the test
waits for that line (the positive signal), changes the files, and reads the outcome."""
import os
import re
import shutil
import subprocess
import time

import pytest

from mpijob import ENGINE, MPI_ENV, Deployment, InteractiveServe, gen

pytestmark = pytest.mark.skipif(not os.path.exists(ENGINE), reason="ckpt-engine not built")

PAUSE_MS = 3000


class PausingServe(InteractiveServe):
    """A 2-rank serve whose ranks pause before the reads of each registration; its log
    goes to a file the test can poll."""

    def __init__(self, dep):
        self.log_path = os.path.join(dep.tmp, "serve-%d.log" % time.monotonic_ns())
        self.fifo = os.path.join(dep.tmp, "cmd-fifo-%d" % time.monotonic_ns())
        os.mkfifo(self.fifo)
        env = dict(MPI_ENV, CKPT_TEST_REGISTER_PAUSE_MS=str(PAUSE_MS))
        args = ["mpirun", "-np", "2", "--bind-to", "none", "-x", "CKPT_TEST_REGISTER_PAUSE_MS",
                ENGINE, "serve", "--socket-dir", dep.sock, "--commands", self.fifo, "--json"]
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=self.log,
                                     text=True)
        self._pending = b""
        self.w = open(self.fifo, "w")

    def wait_paused(self, name, count, timeout=30):
        """Waits until `count` ranks announced the pause of registration `name`."""
        pat = re.compile(r"registering '%s' \(rank \d+\): files opened, pausing" % re.escape(name))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with open(self.log_path) as f:
                if len(pat.findall(f.read())) >= count:
                    return
            time.sleep(0.05)
        with open(self.log_path) as f:
            raise AssertionError("no pause announced for '%s':\n%s" % (name, f.read()))


@pytest.fixture
def setup(tmp_path):
    model = gen(tmp_path, size="16MiB", layers=4, shards=2)
    dep = Deployment(tmp_path, 2)
    serve = PausingServe(dep)
    yield model, dep, serve, tmp_path
    serve.close()
    serve.log.close()


def copy_model(model, tmp_path, name, index=True):
    out = os.path.join(str(tmp_path), name)
    shutil.copytree(model, out)
    if not index:
        for f in os.listdir(out):
            if f.endswith(".json"):
                os.unlink(os.path.join(out, f))
    return out


def shards(path):
    return sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))


def register_while(serve, name, path, change):
    """Registers `path` as `name`, applies `change` while both ranks pause, returns the
    result."""
    serve.send("register %s %s" % (name, path))
    serve.wait_paused(name, 2)
    change()
    return serve.result(timeout=60)


def assert_refused_then_recovers(serve, res, model, words):
    assert not res["ok"], res
    for w in words:
        assert w in res["reason"], (w, res)
    assert "register it again" in res["reason"], res
    # Nothing was kept: the name is free (no rank holds a share: that would be
    # 'already registered'), and a complete checkpoint registers under it.
    good = serve.command("register m %s" % model, timeout=60)
    assert good["ok"], good
    assert serve.command("unregister m")["ok"]


def test_directory_removed_while_registering(setup):
    """The issue's case (a): `rm -rf` of the checkpoint right after the request."""
    model, dep, serve, tmp = setup
    victim = copy_model(model, tmp, "victim")
    res = register_while(serve, "m", victim, lambda: shutil.rmtree(victim))
    assert_refused_then_recovers(serve, res, model, ["vanished while it was read"])


def test_shard_replaced_while_registering(setup):
    """A writer renames a new file onto a shard's path (what `save` tools do): the ranks
    would read the old inode and register bytes that no longer exist at that path."""
    model, dep, serve, tmp = setup
    victim = copy_model(model, tmp, "victim")
    shard = os.path.join(victim, shards(victim)[0])

    def replace():
        shutil.copyfile(shard, shard + ".new")
        os.replace(shard + ".new", shard)

    res = register_while(serve, "m", victim, replace)
    assert_refused_then_recovers(serve, res, model, [shards(victim)[0], "replaced while it was read"])


def test_shard_written_in_place_while_registering(setup):
    """Bytes written into a shard (same size) while it was read: a mix of old and new."""
    model, dep, serve, tmp = setup
    victim = copy_model(model, tmp, "victim")
    shard = os.path.join(victim, shards(victim)[1])

    def write():
        with open(shard, "r+b") as f:
            f.seek(os.path.getsize(shard) - 16)
            f.write(b"\xff" * 16)

    res = register_while(serve, "m", victim, write)
    assert_refused_then_recovers(serve, res, model, [shards(victim)[1], "modified while it was read"])


def test_shard_appearing_in_directory_while_registering(setup):
    """A directory without an index is listed once: a shard a writer adds meanwhile means
    the registered files are not the checkpoint that is there now."""
    model, dep, serve, tmp = setup
    victim = copy_model(model, tmp, "victim", index=False)
    first = shards(victim)[0]
    late = os.path.join(victim, "zz-late.safetensors")
    res = register_while(serve, "m", victim,
                         lambda: shutil.copyfile(os.path.join(victim, first), late))
    assert_refused_then_recovers(serve, res, model, ["zz-late.safetensors appeared",
                                                     "changed while it was registered"])


def test_ranks_that_read_different_checkpoints_refuse(tmp_path):
    """Ranks list and read the files themselves: ranks that see different files under the
    same path (here: the same relative path from different working directories, as two
    hosts with different contents would) must not register shares of two checkpoints."""
    a = os.path.join(str(tmp_path), "a")
    b = os.path.join(str(tmp_path), "b")
    os.makedirs(a)
    os.makedirs(b)
    gen(a, size="8MiB", layers=2, shards=2, name="model")
    gen(b, size="8MiB", layers=3, shards=2, name="model")
    dep = Deployment(tmp_path, 2)
    fifo = os.path.join(str(tmp_path), "cmds")
    with open(fifo, "w") as f:
        f.write("register m model\nregister m %s\nquit\n" % os.path.join(a, "model"))
    args = ["mpirun", "--bind-to", "none",
            "-np", "1", "--wdir", a, ENGINE, "serve", "--socket-dir", dep.sock, "--commands",
            fifo, "--json", ":",
            "-np", "1", "--wdir", b, ENGINE, "serve", "--socket-dir", dep.sock, "--commands",
            fifo, "--json"]
    p = subprocess.run(args, env=MPI_ENV, capture_output=True, text=True, timeout=120)
    import json
    res = [json.loads(l) for l in p.stdout.splitlines() if l.startswith("{")]
    assert len(res) == 2, p.stdout + p.stderr
    assert not res[0]["ok"], res[0]
    assert "another rank read a different checkpoint" in res[0]["reason"], res[0]
    assert res[1]["ok"], res[1]
