"""HTTP control API against REAL engine ranks: `mpirun -np 2 ckpt-engine serve --http 0`
with real ckpt-worker processes, driven by the CLI client and by plain HTTP requests.
Ephemeral ports everywhere; polling with deadlines, never fixed sleeps."""
import http.server
import json
import os
import re
import signal
import subprocess
import threading
import time

import pytest

from mpijob import (ENGINE, MPI_ENV, WORKER, Deployment, assert_worker_equals, gen,
                    http_request, read_checkpoint)

pytestmark = pytest.mark.skipif(not os.path.exists(WORKER), reason="ckpt-worker not built")


def until(pred, timeout=15, what="condition"):
    """Polls pred() until it returns something true; returns that."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            v = pred()
            if v:
                return v
        except (AssertionError, OSError, ValueError, KeyError):
            if time.monotonic() >= deadline:
                raise
        assert time.monotonic() < deadline, "timed out waiting for " + what
        time.sleep(0.05)


class HttpServe:
    """An N-rank serve job with --http on an ephemeral port; stdout read by a thread."""

    def __init__(self, dep, extra=None, nranks=None):
        args = ["mpirun", "-np", str(nranks or dep.n), "--bind-to", "none", ENGINE, "serve",
                "--socket-dir", dep.sock, "--http", "0", "--json"] + (extra or [])
        self.proc = subprocess.Popen(args, env=MPI_ENV, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        self.lines = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        m = until(lambda: self._match(r"http: listening on (http://[^:]+:(\d+))$")
                  or self.proc.poll() is not None, 30, "the listening line")
        assert m is not True, "serve exited %s: %s" % (self.proc.returncode, self.stderr())
        self.url, self.port = m.group(1), int(m.group(2))
        self.rank0_pid = int(until(lambda: self._match(r"http: rank 0 is pid (\d+)")).group(1))
        self.token = None

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def _match(self, pattern):
        for line in list(self.lines):
            m = re.match(pattern, line)
            if m:
                return m
        return None

    def stderr(self):
        return self.proc.stderr.read() if self.proc.poll() is not None else ""

    def results(self):
        """The JSON result lines rank 0 printed for the jobs it ran."""
        return [json.loads(l) for l in list(self.lines) if l.startswith("{")]

    def request(self, method, path, body=None, token=None, raw=None):
        tok = token if token is not None else self.token
        return http_request(self.port, method, path, body, tok, raw, decode=True)

    def get(self, path):
        code, obj = self.request("GET", path)
        assert code == 200, (path, code, obj)
        return obj

    def wait_update(self, uid, timeout=20):
        return until(lambda: (lambda u: u if u["state"] in ("succeeded", "failed") else None)(
            self.get("/v1/updates/%d" % uid)), timeout, "update %d to end" % uid)

    def cli(self, *args, token_file=None):
        cmd = [ENGINE, *map(str, args), "--server", self.url]
        if token_file:
            cmd += ["--token-file", token_file]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60)

    def stop(self, sig=signal.SIGTERM, to_rank0=True, timeout=10):
        """Signals rank 0 (or mpirun); returns (exit status, seconds it took)."""
        t = time.monotonic()
        if self.proc.poll() is None:
            os.kill(self.rank0_pid if to_rank0 else self.proc.pid, sig)
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError("serve did not stop within %d s after %s" % (timeout, sig))
        self.reader.join(5)
        return rc, time.monotonic() - t




@pytest.fixture
def model(tmp_path):
    return gen(tmp_path, size="4MiB", layers=2, shards=2)


def deployment(tmp_path, model, worker_extra=None):
    dep = Deployment(tmp_path, 2)
    for r in range(2):
        dep.start_worker(r, ["--layout", model, "--verify"] + (worker_extra or []))
    return dep


def test_register_update_status_unregister(tmp_path, model):
    dep = deployment(tmp_path, model)
    srv = HttpServe(dep)
    try:
        p = srv.cli("register", "m", model, "--wait")
        assert p.returncode == 0 and "'m' ready" in p.stdout, p.stdout + p.stderr
        want = read_checkpoint(model)
        c = srv.get("/v1/checkpoints/m")
        assert c["state"] == "ready" and c["tensors"] == len(want)
        assert c["bytes"] == sum(len(d) for _, _, d in want.values()) and c["version"] > 0
        p = srv.cli("list")
        assert p.returncode == 0 and re.search(r"^m\s+ready\s", p.stdout, re.M), p.stdout

        p = srv.cli("update", "m", "--bucket-max", "1MiB", "--verify", "--wait")
        assert p.returncode == 0 and "succeeded" in p.stdout, p.stdout + p.stderr
        for r in range(2):
            until(lambda: assert_worker_equals(dep, r, model), 10, "worker %d's dump" % r)

        p = srv.cli("status", "1")
        u = json.loads(p.stdout)
        assert p.returncode == 0 and u["state"] == "succeeded" and u["status"] == 0, p.stdout
        assert u["ranks"] == 2 and u["buckets"] >= 2 and u["tensors"] == len(want)
        assert u["bytes"] == c["bytes"] and u["failed_rank"] == -1 and "trace_url" in u
        # Bytes counted per worker (every worker needs everything here) and per host (one
        # host: nothing crosses), in the result, the trace and /metrics.
        assert u["worker_bytes"] == [c["bytes"]] * 2, u
        assert u["host_bytes_in"] == [0] and u["host_bytes_out"] == [0], u
        trace = srv.request("GET", u["trace_url"])
        assert trace[0] == 200 and trace[1]["traceEvents"]
        for r in range(2):
            got = sum(e["args"]["bytes"] for e in trace[1]["traceEvents"]
                      if e.get("ph") == "X" and e["pid"] == r and e["cat"].startswith("reload"))
            assert got == c["bytes"], (r, got)
        assert [r for r in srv.results() if r["command"] == "update"][0]["ok"]

        metrics = srv.request("GET", "/metrics")[1]
        samples = {}
        for line in metrics.splitlines():
            if line and not line.startswith("#"):
                key, value = line.rsplit(" ", 1)
                samples[key] = float(value)
        assert samples['ckpt_updates_total{result="ok"}'] == 1
        assert samples['ckpt_updates_total{result="failed"}'] == 0
        assert samples["ckpt_update_bytes_total"] == c["bytes"]
        for r in range(2):
            assert samples['ckpt_update_worker_received_bytes_total{rank="%d"}' % r] == c["bytes"]
        assert samples['ckpt_update_host_received_bytes_total{host="0"}'] == 0
        assert samples['ckpt_update_host_sent_bytes_total{host="0"}'] == 0
        assert samples["ckpt_registered_checkpoints"] == 1

        # Registered checkpoints are exported for P2P joiners (docs/METAS.md).
        code, metas = srv.request("GET", "/v1/checkpoints/m/metas")
        assert code == 200, metas
        if not isinstance(metas, dict):
            metas = json.loads(metas)
        assert metas["format"] == "ckpt-metas" and metas["name"] == "m"
        assert len(metas["ranks"]) == 2 and metas["tensors"]

        # Bad requests are refused and the server keeps serving.
        code, err = srv.request("POST", "/v1/checkpoints/m/update", {"bogus": 1})
        assert code == 400 and err["field"] == "bogus"
        code, err = srv.request("POST", "/v1/checkpoints/m/update", raw="{not json")
        assert code == 400
        code, err = srv.request("POST", "/v1/checkpoints/nope/update", {})
        assert code == 404 and "nope" in err["error"]
        code, err = srv.request("POST", "/v1/checkpoints/m/files", {"path": model})
        assert code == 409
        # A failing job is reported to the client; the deployment stays up.
        code, obj = srv.request("POST", "/v1/checkpoints/missing/files",
                                {"path": os.path.join(str(tmp_path), "no-such-dir")})
        assert code == 202
        c2 = until(lambda: (lambda o: o if o["state"] != "registering" else None)(
            srv.get("/v1/checkpoints/missing")))
        assert c2["state"] == "failed" and "no-such-dir" in c2["reason"], c2
        code, err = srv.request("POST", "/v1/checkpoints/m/update", {"mode": "p2p"})
        assert code == 400 and err["field"] == "metas_url", err
        assert srv.request("GET", "/v1/healthz")[0] == 200

        p = srv.cli("unregister", "m")
        assert p.returncode == 0, p.stderr
        until(lambda: srv.request("GET", "/v1/checkpoints/m")[0] == 404, 10, "unregister")
        assert not re.search(r"^m\s", srv.cli("list").stdout, re.M)

        rc, took = srv.stop()
        assert rc == 0 and took < 10, (rc, took, srv.stderr())
    finally:
        if srv.proc.poll() is None:
            srv.proc.kill()
        dep.stop()


class TriggerTarget:
    """A stand-in vLLM server: records every POST (path with query, JSON body or None) in
    arrival order and answers 200. With spawn(socket_paths) set, /collective_rpc runs it
    (real receivers) and answers their results, as vLLM's collective_rpc does."""

    def __init__(self, spawn=None):
        self.calls = []
        self.bodies = []
        target = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                n = int(self.headers.get("Content-Length", 0))
                raw = self.rfile.read(n)
                body = json.loads(raw) if raw else None
                target.calls.append(self.path)
                target.bodies.append(body)
                results = [None]
                if self.path == "/collective_rpc" and spawn:
                    results = spawn(body["kwargs"]["socket_paths"])
                data = json.dumps({"results": results}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *a):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = "http://127.0.0.1:%d/collective_rpc" % self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def rpc_body(self):
        return self.bodies[self.calls.index("/collective_rpc")]

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_one_update_at_a_time_and_trigger(tmp_path, model):
    # The workers' post-hooks sleep, so the update is still running when we ask again.
    dep = deployment(tmp_path, model, ["--post-hook-sleep-ms", "3000"])
    target = TriggerTarget()
    srv = HttpServe(dep)
    try:
        assert srv.cli("register", "m", model, "--wait").returncode == 0
        code, obj = srv.request("POST", "/v1/checkpoints/m/update",
                                {"update_url": target.url, "bucket_max": "1MiB"})
        assert code == 202, obj
        uid = obj["update_id"]
        code, err = srv.request("POST", "/v1/checkpoints/m/update", {})
        assert code == 409 and "one update runs at a time" in err["error"], err
        code, err = srv.request("DELETE", "/v1/checkpoints/m")
        assert code == 409
        u = srv.wait_update(uid, timeout=30)
        assert u["state"] == "succeeded" and u["trigger"], u
        assert u["timings"]["finish_s"] >= 2.5, u

        # vLLM's generation paused before the trigger, resumed after the update.
        assert target.calls == ["/pause?mode=wait", "/collective_rpc", "/reset_prefix_cache",
                                "/resume"], target.calls
        assert u["paused"] and u["resumed"], u
        body = target.rpc_body()
        assert body["method"] == "ckpt_engine_update"
        assert body["kwargs"]["socket_paths"] == {
            str(r): os.path.join(os.path.abspath(dep.sock), "rank-%d.sock" % r) for r in range(2)}
        assert body["kwargs"]["update_id"] == uid and body["kwargs"]["name"] == "m"
        assert body["kwargs"]["version"] == srv.get("/v1/checkpoints/m")["version"]
        for r in range(2):
            until(lambda: assert_worker_equals(dep, r, model), 10, "worker %d's dump" % r)

        # A trigger nobody answers fails the update with a reason naming the URL.
        dead = "http://127.0.0.1:1/collective_rpc"
        code, obj = srv.request("POST", "/v1/checkpoints/m/update",
                                {"update_url": dead, "timeout_ms": 5000, "pause": "off"})
        assert code == 202
        u = srv.wait_update(obj["update_id"], timeout=30)
        assert u["state"] == "failed" and dead in u["reason"], u
        assert srv.request("GET", "/v1/healthz")[0] == 200
    finally:
        if srv.proc.poll() is None:
            srv.stop()
        target.close()
        dep.stop()


def test_token_and_stop_through_mpirun(tmp_path, model):
    dep = Deployment(tmp_path, 2)
    tok = os.path.join(str(tmp_path), "token")
    with open(tok, "w") as f:
        f.write("  s3cret-token\n")
    srv = HttpServe(dep, ["--token-file", tok])
    try:
        code, err = srv.request("GET", "/v1/checkpoints")
        assert code == 401, err
        code, _ = srv.request("GET", "/v1/checkpoints", token="wrong")
        assert code == 401
        assert srv.request("GET", "/v1/healthz")[0] == 200
        assert srv.request("GET", "/v1/checkpoints", token="s3cret-token")[0] == 200
        p = srv.cli("register", "m", model, "--wait", token_file=tok)
        assert p.returncode == 0, p.stderr
        p = srv.cli("list")
        assert p.returncode == 1 and "401" in p.stderr, p.stderr
        # mpirun turns SIGTERM into SIGTERM for every rank: rank 0 shuts all down cleanly
        # (mpirun itself reports an abort, whatever the ranks did).
        rc, took = srv.stop(to_rank0=False)
        assert took < 10
        assert "SIGTERM: stopping every rank" in srv.stderr()
    finally:
        if srv.proc.poll() is None:
            srv.proc.kill()


@pytest.mark.parametrize("content,why", [(None, "cannot read token file"), ("  \n", "is empty")])
def test_bad_token_file(tmp_path, content, why):
    tok = os.path.join(str(tmp_path), "token")
    if content is not None:
        with open(tok, "w") as f:
            f.write(content)
    p = subprocess.run(["mpirun", "-np", "2", "--bind-to", "none", ENGINE, "serve", "--http", "0",
                        "--token-file", tok], env=MPI_ENV, capture_output=True, text=True,
                       timeout=60)
    assert p.returncode != 0 and why in p.stderr, p.stderr
    assert "http: listening" not in p.stdout


def test_commands_file_then_http(tmp_path, model):
    dep = Deployment(tmp_path, 2)
    cmds = os.path.join(str(tmp_path), "commands")
    with open(cmds, "w") as f:
        f.write("register boot %s\nlist\n" % model)
    srv = HttpServe(dep, ["--commands", cmds])
    try:
        c = until(lambda: (lambda r: r[0] == 200 and r[1])(
            srv.request("GET", "/v1/checkpoints/boot")), 20, "boot published")
        want = read_checkpoint(model)
        assert c["state"] == "ready" and c["tensors"] == len(want) and c["version"] > 0
        assert c["bytes"] == sum(len(d) for _, _, d in want.values())
        assert any(r["command"] == "register" and r["ok"] for r in srv.results())
        # Exported too (published right after the checkpoint itself).
        code, metas = until(lambda: (lambda r: r if r[0] == 200 else None)(
            srv.request("GET", "/v1/checkpoints/boot/metas")), 10, "boot's metas")
        if isinstance(metas, bytes):
            metas = metas.decode()
        if not isinstance(metas, dict):
            metas = json.loads(metas)
        assert code == 200 and metas["format"] == "ckpt-metas" and metas["name"] == "boot"
        code, obj = srv.request("DELETE", "/v1/checkpoints/boot")
        assert code == 202
        until(lambda: srv.request("GET", "/v1/checkpoints/boot")[0] == 404, 10, "unregister")
        rc, took = srv.stop(sig=signal.SIGINT)
        assert rc == 0 and took < 10, srv.stderr()
    finally:
        if srv.proc.poll() is None:
            srv.proc.kill()


def test_serve_help_documents_http(run_tool):
    out = run_tool("serve", "--help").stdout
    assert "--http [ADDR:]PORT" in out and "--token-file FILE" in out
    p = run_tool("serve", "--http", "nope:x", check=False)
    assert p.returncode == 2 and "[ADDR:]PORT" in p.stderr


def test_p2p_update_over_http(tmp_path, model):
    """A second deployment joins through its own HTTP API: it fetches the first one's metas
    (GET /v1/checkpoints/m/metas) and pulls over UCX; its workers end up byte-identical."""
    sdir, jdir = tmp_path / "serving", tmp_path / "joining"
    sdir.mkdir()
    jdir.mkdir()
    sdep = Deployment(sdir, 2)
    jdep = deployment(jdir, model)
    ssrv = HttpServe(sdep)
    jsrv = None
    try:
        p = ssrv.cli("register", "m", model, "--wait")
        assert p.returncode == 0, p.stdout + p.stderr
        jsrv = HttpServe(jdep)
        p = jsrv.cli("update", "m", "--metas-url", ssrv.url + "/v1/checkpoints/m/metas",
                     "--verify", "--wait")
        assert p.returncode == 0 and "succeeded" in p.stdout, p.stdout + p.stderr
        for r in range(2):
            until(lambda: assert_worker_equals(jdep, r, model), 10, "worker %d's dump" % r)
        # Metas of a checkpoint that is not the one named in the URL are refused.
        code, obj = jsrv.request("POST", "/v1/checkpoints/other/update",
                                 {"mode": "p2p", "metas_url": ssrv.url + "/v1/checkpoints/m/metas"})
        assert code == 202, obj
        u = jsrv.wait_update(obj["update_id"])
        assert u["state"] == "failed" and "describe 'm'" in u["reason"], u
    finally:
        for s in (jsrv, ssrv):
            if s:
                s.stop()
        sdep.stop()
        jdep.stop()


def test_checkpoint_engine_files_and_vllm_trigger(tmp_path, model):
    """checkpoint-engine's controller sequence against real ranks: POST .../files with a
    list of files, POST .../gather-metas, POST .../update with update_url at a stand-in
    vLLM whose collective_rpc starts real receivers (ckpt-worker) on the sockets it is
    given; they end up byte-identical to the files. A failing receiver leaves vLLM paused."""
    dep = Deployment(tmp_path, 2)
    fail = {"bucket": None}

    def spawn(socket_paths):
        procs = []
        for i, path in sorted(socket_paths.items()):
            args = [WORKER, "--socket", path, "--layout", model, "--verify", "--updates", "1",
                    "--dump", dep.worker_dump(int(i)), "--timeout-ms", "20000"]
            if fail["bucket"] is not None:
                args += ["--fail-on-bucket", str(fail["bucket"])]
            procs.append(subprocess.Popen(args, stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT, text=True))
        out = []
        for p in procs:
            text, _ = p.communicate(timeout=60)
            out.append({"completed": p.returncode == 0, "reason": text.strip()[-200:]})
        return out

    target = TriggerTarget(spawn)
    srv = HttpServe(dep)
    try:
        files = sorted(os.path.join(model, f) for f in os.listdir(model)
                       if f.endswith(".safetensors"))
        assert len(files) == 2
        code, obj = srv.request("POST", "/v1/checkpoints/ce/files", {"files": files[::-1]})
        assert code == 202, obj
        code, obj = srv.request("POST", "/v1/checkpoints/ce/gather-metas")
        assert code == 200 and obj["state"] == "ready" and obj["ranks"] == 2, obj
        want = read_checkpoint(model)
        assert obj["tensors"] == len(want)
        assert obj["bytes"] == sum(len(d) for _, _, d in want.values())

        code, obj = srv.request("POST", "/v1/checkpoints/ce/update",
                                {"update_url": target.url, "inference_group_ranks": [0, 1],
                                 "ranks": [0, 1], "timeout": 30, "uds": None})
        assert code == 202, obj
        u = srv.wait_update(obj["update_id"], timeout=60)
        assert u["state"] == "succeeded" and u["paused"] and u["resumed"], u
        assert target.calls == ["/pause?mode=wait", "/collective_rpc", "/reset_prefix_cache",
                                "/resume"]
        assert target.rpc_body()["kwargs"]["socket_paths"] == {
            str(r): os.path.join(os.path.abspath(dep.sock), "rank-%d.sock" % r) for r in range(2)}
        for r in range(2):
            assert_worker_equals(dep, r, model)

        # A receiver that fails a bucket fails the update: vLLM stays paused, and says so.
        fail["bucket"] = 0
        code, obj = srv.request("POST", "/v1/checkpoints/ce/update",
                                {"update_url": target.url, "timeout": 30})
        assert code == 202, obj
        u = srv.wait_update(obj["update_id"], timeout=60)
        assert u["state"] == "failed" and u["paused"] and not u["resumed"], u
        assert "left paused" in u["reason"], u
        assert target.calls[4:] == ["/pause?mode=wait", "/collective_rpc"], target.calls
    finally:
        if srv.proc.poll() is None:
            srv.stop()
        target.close()
        dep.stop()
