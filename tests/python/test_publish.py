"""Publishing from trainers (docs/PUBLISH.md) with real processes: `mpirun -np 2
ckpt-engine serve`, trainers publishing from Python (in this process or their own), real
ckpt-worker processes updated from what was published and compared byte for byte."""
import json
import os
import re
import socket
import struct
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

import mpijob
from mpijob import WORKER, Deployment, InteractiveServe, read_checkpoint

SRC = os.environ.get("CKPT_SOURCE_DIR", os.path.join(os.path.dirname(__file__), "..", ".."))
PYDIR = os.path.join(SRC, "python")
BUILD = os.environ.get("CKPT_BUILD_DIR", os.path.join(SRC, "build", "release"))
# Raw frames speak the wire version of this checkout (src/ipc/wire.h), not a copy of it.
with open(os.path.join(SRC, "src", "ipc", "wire.h")) as _f:
    WIRE_VERSION = int(re.search(r"#define CKPT_IPC_VERSION (\d+)u", _f.read()).group(1))

pytestmark = pytest.mark.skipif(
    os.environ.get("CKPT_SANITIZE") == "ON" or not os.path.exists(WORKER),
    reason="needs the non-sanitizer build (ctypes cannot load an ASan libckpt.so)")

TRAINER = textwrap.dedent("""
    import json, sys
    import numpy as np
    sys.path[:0] = [sys.argv[1]]
    from ckpt_engine import publish
    a = json.loads(sys.argv[2])
    data = np.load(a["npz"])
    tensors = {k: data[k] for k in data.files}
    try:
        r = publish(a["name"], tensors, socket_dir=a["dir"], part=a["part"], parts=a["parts"],
                    step=a["step"], wait=a["wait"], timeout_s=30, pull=a.get("pull"))
        print(json.dumps({"ok": True, "registered": r.registered, "version": r.version,
                          "text": r.text, "socket": r.socket}))
    except Exception as e:
        print(json.dumps({"ok": False, "error": str(e)}))
""")


def ckpt_engine():
    if PYDIR not in sys.path:
        sys.path.insert(0, PYDIR)
    os.environ.setdefault("CKPT_BUILD_DIR", BUILD)
    import ckpt_engine as ce
    return ce


def arrays(seed, names=("layers.0.w", "layers.0.b", "layers.1.w", "layers.1.b", "embed")):
    """Tensors of several dtypes and odd sizes, different for every seed."""
    rng = np.random.default_rng(seed)
    kinds = [((64, 96), np.float32), ((7,), np.int8), ((33, 5), np.float16), ((3,), np.int64),
             ((300, 17), np.uint16)]
    out = {}
    for i, n in enumerate(names):
        shape, dt = kinds[i % len(kinds)]
        out[n] = (rng.standard_normal(shape) * 100).astype(dt)
    return out


def start_trainer(tmp, sock, name, tensors, part, parts, step=0, wait=True):
    npz = os.path.join(str(tmp), "trainer-%s-%d-%d-%d.npz" % (name, part, step, time.monotonic_ns()))
    np.savez(npz, **tensors)
    a = {"npz": npz, "name": name, "dir": sock, "part": part, "parts": parts, "step": step,
         "wait": wait, "pull": False}  # sealed memfds: these tests count them
    env = dict(os.environ, CKPT_BUILD_DIR=BUILD)
    return subprocess.Popen([sys.executable, "-c", TRAINER, PYDIR, json.dumps(a)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def trainer_result(p, timeout=60):
    out, err = p.communicate(timeout=timeout)
    lines = [l for l in out.splitlines() if l.startswith("{")]
    assert lines, "trainer printed nothing: " + out + err
    return json.loads(lines[-1])


def no_result(serve, seconds):
    """True when rank 0 prints no result for `seconds` (the command is still waiting)."""
    try:
        serve.result(timeout=seconds)
    except AssertionError:
        return True
    return False


def wait_sockets(dep, n=2, timeout=30):
    deadline = time.monotonic() + timeout
    paths = [os.path.join(dep.sock, "publish-%d.sock" % r) for r in range(n)]
    while not all(os.path.exists(p) for p in paths):
        assert time.monotonic() < deadline, "publish sockets did not appear"
        time.sleep(0.05)


def publish_memfds(pid):
    """The published memfds a rank process holds (adopted in place: never copied)."""
    n = 0
    for fd in os.listdir("/proc/%d/fd" % pid):
        try:
            if "memfd:ckpt-publish" in os.readlink("/proc/%d/fd/%s" % (pid, fd)):
                n += 1
        except OSError:
            pass
    return n


def assert_worker_holds(dep, r, tensors):
    """Worker r's dump holds exactly `tensors`, byte for byte."""
    got = read_checkpoint(dep.worker_dump(r))
    assert set(got) == set(tensors), (sorted(got), sorted(tensors))
    for name, arr in tensors.items():
        dt, shape, data = got[name]
        assert shape == arr.shape, name
        assert data == np.ascontiguousarray(arr).tobytes(), "worker %d: tensor %s differs" % (r, name)


def update_and_check(dep, serve, tensors, name="m"):
    for r in range(dep.n):
        dep.start_worker(r, ["--verify"], updates=1)
    res = serve.command("update %s" % name)
    assert res["ok"], res
    dep.wait_workers()
    for r in range(dep.n):
        assert_worker_holds(dep, r, tensors)
    return res


@pytest.fixture
def deployment(tmp_path):
    dep = Deployment(tmp_path, 2)
    serve = InteractiveServe(dep, ["--timeout-ms", "20000"])
    wait_sockets(dep)
    yield dep, serve
    serve.close()
    dep.stop()


def test_publish_one_part_then_update(deployment):
    dep, serve = deployment
    ce = ckpt_engine()
    tensors = arrays(1)
    serve.send("await-published m timeout=30000")
    res = ce.publish("m", tensors, socket_dir=dep.sock, timeout_s=30, pull=False)
    assert res.registered and res.version > 0 and res.socket.endswith("publish-0.sock"), res
    done = serve.result()
    assert done["command"] == "await-published" and done["ok"], done
    assert done["version"] == res.version and done["parts"] == 1 and done["tensors"] == 5
    assert done["bytes"] == sum(a.nbytes for a in tensors.values())
    # Adopted in place: rank 0 holds the trainer's memfd itself, the trainer none any more.
    assert sum(publish_memfds(p) for p in serve.rank_pids()) == 1
    assert publish_memfds(os.getpid()) == 0
    upd = update_and_check(dep, serve, tensors)
    assert upd["version"] == res.version and upd["tensors"] == 5


def test_two_trainers_each_publish_a_half(deployment, tmp_path):
    dep, serve = deployment
    tensors = arrays(2)
    names = sorted(tensors)
    half = [{n: tensors[n] for n in names[0::2]}, {n: tensors[n] for n in names[1::2]}]
    serve.send("await-published m timeout=30000")
    first = start_trainer(tmp_path, dep.sock, "m", half[0], part=0, parts=2)
    # One part is in: nothing is registered, the trainer keeps waiting.
    assert no_result(serve, 2.0)
    assert first.poll() is None
    second = start_trainer(tmp_path, dep.sock, "m", half[1], part=1, parts=2)
    done = serve.result()
    assert done["ok"] and done["parts"] == 2 and done["tensors"] == len(tensors), done
    a, b = trainer_result(first), trainer_result(second)
    assert a["ok"] and b["ok"] and a["registered"] and a["version"] == b["version"] == done["version"]
    # Balanced over the ranks: part k went to rank k, each rank adopted its own part.
    assert a["socket"].endswith("publish-0.sock") and b["socket"].endswith("publish-1.sock")
    assert sorted(publish_memfds(p) for p in serve.rank_pids()) == [1, 1]
    update_and_check(dep, serve, tensors)


def test_overlapping_parts_are_refused(deployment, tmp_path):
    dep, serve = deployment
    t = arrays(3)
    shared = t["embed"]
    a = {"layers.0.w": t["layers.0.w"], "embed": shared}
    b = {"layers.1.w": t["layers.1.w"], "embed": shared}
    serve.send("await-published m timeout=30000")
    pa = start_trainer(tmp_path, dep.sock, "m", a, part=0, parts=2)
    pb = start_trainer(tmp_path, dep.sock, "m", b, part=1, parts=2)
    done = serve.result()
    assert not done["ok"] and done["status"] == "CKPT_EINVAL", done
    assert "'embed'" in done["reason"] and "part 0" in done["reason"] and "part 1" in done["reason"]
    for p in (pa, pb):
        r = trainer_result(p)
        assert not r["ok"] and "'embed'" in r["error"] and "disjoint" in r["error"], r
    # Nothing registered, every fd given back.
    res = serve.command("update m")
    assert not res["ok"] and "not registered" in res["reason"], res
    assert sum(publish_memfds(p) for p in serve.rank_pids()) == 0


def test_missing_part_is_named_after_the_bound(deployment):
    dep, serve = deployment
    ce = ckpt_engine()
    t = arrays(4)
    for part, name in ((0, "layers.0.w"), (2, "embed")):
        r = ce.publish("m", {name: t[name]}, socket_dir=dep.sock, part=part, parts=3, wait=False)
        assert not r.registered and "accepted" in r.text, r
    t0 = time.monotonic()
    done = serve.command("await-published m timeout=1500")
    assert time.monotonic() - t0 < 10
    assert not done["ok"] and done["status"] == "CKPT_ETIMEDOUT", done
    assert "part(s) 1 of 3 missing" in done["reason"], done["reason"]
    # The parts that came were dropped: part 1 alone now misses 0 and 2.
    assert sum(publish_memfds(p) for p in serve.rank_pids()) == 0
    ce.publish("m", {"layers.1.w": t["layers.1.w"]}, socket_dir=dep.sock, part=1, parts=3,
               wait=False)
    done = serve.command("await-published m timeout=1000")
    assert not done["ok"] and "part(s) 0, 2 of 3 missing" in done["reason"], done


def test_next_step_replaces_the_version(deployment):
    dep, serve = deployment
    ce = ckpt_engine()
    versions = []
    for step in (1, 2, 3):
        tensors = arrays(100 + step)
        serve.send("await-published m timeout=30000")
        r = ce.publish("m", tensors, socket_dir=dep.sock, step=step, timeout_s=30, pull=False)
        done = serve.result()
        assert done["ok"] and done["version"] == r.version and done["step"] == step, done
        assert done["replaced"] == (step > 1)
        versions.append(r.version)
        # Host memory stays bounded: the previous version's memfd is gone.
        assert sum(publish_memfds(p) for p in serve.rank_pids()) == 1
        if step < 3:
            upd = update_and_check(dep, serve, tensors)
            assert upd["version"] == r.version
    assert versions == sorted(versions) and len(set(versions)) == 3


def raw_publish(path, name, fd, size, part=0, nparts=1):
    """One PUBLISH frame by hand (docs/PUBLISH.md), the fd attached; the first answer."""
    payload = struct.pack("<IIQQIH", part, nparts, 0, size, 0, len(name)) + name.encode()
    frame = struct.pack("<IHHI", 0x54504B43, WIRE_VERSION, 9, len(payload)) + payload
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(path)
    socket.send_fds(s, [frame], [fd])
    hdr = b""
    while len(hdr) < 12:
        hdr += s.recv(12 - len(hdr))
    magic, version, mtype, length = struct.unpack("<IHHI", hdr)
    body = b""
    while len(body) < length:
        body += s.recv(length - len(body))
    s.close()
    status, kind, ver, tlen = struct.unpack("<iIQH", body[:18])
    assert mtype == 10 and magic == 0x54504B43
    return status, kind, body[18:18 + tlen].decode()


def safetensors_memfd(seal):
    import fcntl
    header = json.dumps({"t": {"dtype": "U8", "shape": [8], "data_offsets": [0, 8]}}).encode()
    header += b" " * ((8 - len(header) % 8) % 8)
    data = struct.pack("<Q", len(header)) + header + bytes(range(8))
    fd = os.memfd_create("raw", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.write(fd, data)
    if seal:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
    return fd, len(data)


def test_unsealed_memfd_is_refused(deployment):
    dep, serve = deployment
    path = os.path.join(dep.sock, "publish-1.sock")
    fd, size = safetensors_memfd(seal=False)
    status, kind, text = raw_publish(path, "raw", fd, size)
    os.close(fd)
    assert status == -13 and kind == 3, (status, kind, text)  # CKPT_EPERM, REFUSED
    assert "not sealed" in text and "F_SEAL_WRITE" in text and "F_ADD_SEALS" in text, text
    # The same bytes, sealed: accepted (the raw client is right; only the seals differ).
    fd, size = safetensors_memfd(seal=True)
    status, kind, text = raw_publish(path, "raw", fd, size)
    os.close(fd)
    assert status == 0 and kind == 1 and "accepted" in text, text
    done = serve.command("await-published raw timeout=5000")
    assert done["ok"] and done["tensors"] == 1, done


CHILD = textwrap.dedent("""
    import fcntl, json, os, socket, struct, sys
    path, wire_version = sys.argv[1], int(sys.argv[2])
    header = json.dumps({"t": {"dtype": "U8", "shape": [8], "data_offsets": [0, 8]}}).encode()
    header += b" " * ((8 - len(header) % 8) % 8)
    data = struct.pack("<Q", len(header)) + header + bytes(range(8))
    fd = os.memfd_create("raw", os.MFD_ALLOW_SEALING)
    os.write(fd, data)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
    payload = struct.pack("<IIQQIH", 0, 1, 0, len(data), 0, 3) + b"uid"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(path)
    socket.send_fds(s, [struct.pack("<IHHI", 0x54504B43, wire_version, 9, len(payload)) + payload], [fd])
    body = b""
    while True:
        chunk = s.recv(4096)
        if not chunk:
            break
        body += chunk
    status, kind, ver, tlen = struct.unpack("<iIQH", body[12:30])
    print(json.dumps({"status": status, "kind": kind, "text": body[30:30 + tlen].decode()}))
""")


def test_other_uid_is_refused(tmp_path, monkeypatch):
    """SO_PEERCRED: a process of another uid is refused even when it can reach the socket.
    As root the test runs a real uid-65534 process (socket made reachable for it);
    otherwise the engine's test hook refuses this uid the same way."""
    # The child needs a python that uid 65534 may run (not one under /root).
    root = os.geteuid() == 0 and os.path.exists("/usr/bin/python3")
    if not root:
        monkeypatch.setitem(mpijob.MPI_ENV, "CKPT_TEST_PUBLISH_DENY_UID", str(os.geteuid()))
    import shutil
    import tempfile
    # pytest's tmp_path sits under a 0700 directory that uid 65534 cannot cross.
    base = tempfile.mkdtemp(prefix="ckpt-publish-uid-", dir="/tmp") if root else str(tmp_path)
    dep = Deployment(base, 2)
    serve = InteractiveServe(dep)
    try:
        wait_sockets(dep)
        path = os.path.join(dep.sock, "publish-0.sock")
        kw = {}
        if root:
            os.chmod(base, 0o755)
            os.chmod(dep.sock, 0o755)
            os.chmod(path, 0o666)
            kw = {"user": 65534, "group": 65534}
        py = "/usr/bin/python3" if root else sys.executable
        p = subprocess.run([py, "-c", CHILD, path, str(WIRE_VERSION)], capture_output=True, text=True,
                           timeout=30, cwd="/", **kw)
        assert p.stdout.strip(), p.stderr
        r = json.loads(p.stdout.strip().splitlines()[-1])
        uid = 65534 if root else os.geteuid()
        assert r["status"] == -13 and r["kind"] == 3, r
        assert "uid %d may not publish" % uid in r["text"], r
        done = serve.command("await-published uid timeout=500")
        assert not done["ok"] and "no part of 'uid'" in done["reason"], done
    finally:
        serve.close()
        dep.stop()
        if root:
            shutil.rmtree(base, ignore_errors=True)


def test_published_checkpoint_shows_on_the_http_api(tmp_path):
    """With --http rank 0 registers what is published while idle: no command needed."""
    from test_http_engine import HttpServe
    dep = Deployment(tmp_path, 2)
    srv = HttpServe(dep)
    try:
        wait_sockets(dep)
        ce = ckpt_engine()
        tensors = arrays(5)
        def listing(version):
            # The trainer hears "registered" from inside the engine's poll; the HTTP listing
            # is updated right after it, on rank 0's main thread (a window of milliseconds).
            deadline = time.monotonic() + 5
            while True:
                cps = {c["name"]: c for c in srv.get("/v1/checkpoints")["checkpoints"]}
                if cps.get("m", {}).get("version") == version or time.monotonic() > deadline:
                    return cps
                time.sleep(0.02)

        r = ce.publish("m", tensors, socket_dir=dep.sock, part=0, parts=1, timeout_s=30)
        assert r.registered
        cps = listing(r.version)
        assert cps["m"]["state"] == "ready" and cps["m"]["version"] == r.version, cps
        assert cps["m"]["tensors"] == len(tensors)
        r2 = ce.publish("m", arrays(6), socket_dir=dep.sock, step=1, timeout_s=30)
        assert r2.version > r.version
        cps = listing(r2.version)
        assert cps["m"]["version"] == r2.version, cps
        assert any(l.get("command") == "publish" and l["ok"] for l in srv.results())
    finally:
        srv.stop()
        dep.stop()


def test_torch_tensors(deployment):
    try:
        import torch
    except ImportError:
        pytest.skip("torch is not importable in this python (the numpy path is tested above)")
    dep, serve = deployment
    ce = ckpt_engine()
    t = {"bf": torch.randn(17, 9).to(torch.bfloat16), "f": torch.randn(5, 3).t(),
         "i": torch.arange(10, dtype=torch.int64)}
    if torch.cuda.is_available():
        t["cuda"] = torch.randn(33, device="cuda")
    serve.send("await-published m timeout=30000")
    r = ce.publish("m", t, socket_dir=dep.sock)
    assert r.registered and serve.result()["ok"]
    want = {k: v.detach().cpu().contiguous().view(torch.uint8).numpy().reshape(-1) for k, v in t.items()}
    for r_ in range(dep.n):
        dep.start_worker(r_, ["--verify"], updates=1)
    assert serve.command("update m")["ok"]
    dep.wait_workers()
    got = read_checkpoint(dep.worker_dump(0))
    assert got["bf"][0] == "BF16" and got["bf"][1] == (17, 9)
    for k, v in want.items():
        assert got[k][2] == v.tobytes(), k


def pulled_memfds(pid):
    """(inode, size) of every memfd a rank filled by pulling from a trainer."""
    out = set()
    for fd in os.listdir("/proc/%d/fd" % pid):
        try:
            if "memfd:ckpt-pulled" in os.readlink("/proc/%d/fd/%s" % (pid, fd)):
                st = os.stat("/proc/%d/fd/%s" % (pid, fd))
                out.add((st.st_ino, st.st_size))
        except OSError:
            pass
    return out


def test_pull_reuses_the_memory_of_the_step_before_last(deployment):
    """publish(pull=True): the engine rank reads the trainer's arrays itself into a memfd
    of its own; step 3 lands in step 1's memfd (no new pages), step 4 in step 2's; workers
    get every step's bytes exactly; the rank never holds more than two such memfds."""
    dep, serve = deployment
    ce = ckpt_engine()
    inodes = []
    for step in (1, 2, 3, 4):
        tensors = arrays(200 + step)
        serve.send("await-published m timeout=30000")
        r = ce.publish("m", tensors, socket_dir=dep.sock, step=step, timeout_s=30, pull=True,
                       rank=0)
        done = serve.result()
        assert done["ok"] and done["version"] == r.version and done["step"] == step, done
        # Nothing of the trainer's is held: no sealed memfd came over.
        assert sum(publish_memfds(p) for p in serve.rank_pids()) == 0
        held = pulled_memfds(serve.rank_pids()[0])
        assert 1 <= len(held) <= 2, held
        upd = update_and_check(dep, serve, tensors)
        assert upd["version"] == r.version
        # Which memfd holds this step: the one that is new since the last step, or the only
        # one rank 0 holds that is not the previous step's.
        mine = [h for h in held if not inodes or h[0] != inodes[-1]]
        assert len(mine) == 1, (held, inodes)
        inodes.append(mine[0][0])
    assert inodes[2] == inodes[0] and inodes[3] == inodes[1], inodes
    assert inodes[0] != inodes[1]
    # Unregistered: the version's memfd is closed and the listener lets go of its mapping
    # (checked when idle, every second); the one spare left is an fd, not a mapping.
    assert serve.command("unregister m")["ok"]
    pid = serve.rank_pids()[0]
    deadline = time.monotonic() + 10
    while True:
        with open("/proc/%d/maps" % pid) as f:
            mapped = {l.split()[4] for l in f if "memfd:ckpt-pulled" in l}
        if inodes[3] not in {int(x) for x in mapped} or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert inodes[3] not in {int(x) for x in mapped}, mapped


def test_pull_of_memory_the_trainer_does_not_map_is_refused(deployment):
    """A source address the trainer does not map: refused naming the tensor, the registered
    version stays and still updates the workers; the next good pull works."""
    dep, serve = deployment
    ce = ckpt_engine()
    good = arrays(7)
    serve.send("await-published m timeout=30000")
    ce.publish("m", good, socket_dir=dep.sock, timeout_s=30, pull=True, rank=0)
    assert serve.result()["ok"]
    L = ce.receiver.lib()
    import ctypes
    from ckpt_engine import _lib
    from ckpt_engine.publish import PublishOptions, PublishReply
    metas = (_lib.TensorMeta * 1)()
    metas[0].name = b"w"
    metas[0].dtype = _lib.DTYPES["F32"][0]
    metas[0].ndim = 1
    metas[0].shape[0] = 1 << 20
    pub = ctypes.c_void_p()
    assert L.ckpt_publish_begin_pull(b"m", metas, 1, ctypes.byref(pub)) == 0
    try:
        assert L.ckpt_publish_set_source(pub, 0, 0x10000) == 0  # never mapped
        opts = PublishOptions(0, 0, 1, 9, 0, 10000)
        reply = PublishReply()
        path = os.path.join(dep.sock, "publish-0.sock").encode()
        rc = L.ckpt_publish_send(pub, path, ctypes.byref(opts), ctypes.byref(reply))
    finally:
        L.ckpt_publish_free(pub)
    text = reply.text.decode()
    assert rc < 0 and "tensor 'w'" in text and "does not map" in text, text
    update_and_check(dep, serve, good)  # the registered version is untouched
    serve.send("await-published m timeout=30000")
    ce.publish("m", arrays(8), socket_dir=dep.sock, step=10, timeout_s=30, pull=True, rank=0)
    assert serve.result()["ok"]


def pulled_maps(pid):
    """{inode: start address} of the ckpt-pulled memfds a process maps."""
    out = {}
    with open("/proc/%d/maps" % pid) as f:
        for l in f:
            if "memfd:ckpt-pulled" in l:
                parts = l.split()
                out[int(parts[4])] = parts[0].split("-")[0]
    return out


def test_workers_keep_the_mapping_of_a_refilled_memfd(deployment):
    """Running workers across pulled steps: a worker keeps its mapping of the memfd of the
    version before (the engine refills it at the next step), so at step 3 it reads through
    the very mapping it made at step 1; it never maps more than two; every step verified
    (--verify) and the last one compared byte for byte."""
    dep, serve = deployment
    ce = ckpt_engine()
    steps = 4
    for r in range(dep.n):
        dep.start_worker(r, ["--verify"], updates=steps)
    seen = []
    for step in range(1, steps + 1):
        tensors = arrays(300 + step)
        serve.send("await-published m timeout=30000")
        ce.publish("m", tensors, socket_dir=dep.sock, step=step, timeout_s=30, pull=True, rank=0)
        assert serve.result()["ok"]
        res = serve.command("update m")
        assert res["ok"], res
        if step == steps:
            break  # the workers exit after their last update: nothing to look at
        maps = pulled_maps(dep.workers[0].pid)
        assert 1 <= len(maps) <= 2, (step, maps, res, dep.worker_log(0)[-2000:])
        seen.append(maps)
    dep.wait_workers()
    for r in range(dep.n):
        assert dep.workers[r].returncode == 0, dep.worker_log(r)
        assert_worker_holds(dep, r, tensors)
    # After step 2 the worker still maps step 1's memfd (kept: the engine refills it at
    # step 3), and step 3 reads through that very mapping.
    assert set(seen[0]) < set(seen[1]) and len(seen[1]) == 2, seen
    shared = set(seen[0]) & set(seen[2])
    assert shared and all(seen[0][i] == seen[2][i] for i in shared), seen


@pytest.mark.parametrize("deny", [False, True])
def test_default_pulls_and_falls_back_to_a_memfd_when_refused(tmp_path, monkeypatch, deny):
    """publish() without `pull`: the engine reads the trainer's memory (a pulled memfd, no
    sealed one); an engine that may not (here its test hook refuses every pull as EPERM,
    as another pid namespace or Yama would) gets the same tensors through a sealed memfd,
    with a warning, and that socket is not asked to pull again. Workers verified."""
    import warnings
    if deny:
        monkeypatch.setitem(mpijob.MPI_ENV, "CKPT_TEST_PUBLISH_DENY_PULL", "1")
    dep = Deployment(tmp_path, 2)
    serve = InteractiveServe(dep, ["--timeout-ms", "20000"])
    try:
        wait_sockets(dep)
        ce = ckpt_engine()
        for step in (1, 2):
            tensors = arrays(400 + step)
            serve.send("await-published m timeout=30000")
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                ce.publish("m", tensors, socket_dir=dep.sock, step=step, timeout_s=30, rank=0)
            assert serve.result()["ok"]
            said = [str(w.message) for w in caught if "cannot read" in str(w.message)]
            assert len(said) == (1 if deny and step == 1 else 0), said
            rank0 = serve.rank_pids()[0]
            assert publish_memfds(rank0) == (1 if deny else 0)
            assert (len(pulled_memfds(rank0)) > 0) == (not deny)
            update_and_check(dep, serve, tensors)
    finally:
        serve.close()
        dep.stop()
