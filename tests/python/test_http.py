"""HTTP control API against a fake rank 0 (test_http_server --serve): every endpoint, bad
requests, auth, one update at a time, progress, traces, the inference-server trigger and
the Prometheus text. Real processes on ephemeral ports; polling, never fixed sleeps."""
import http.client
import http.server
import json
import os
import re
import subprocess
import threading
import time

import pytest

from mpijob import http_request

BUILD = os.environ.get("CKPT_BUILD_DIR", "build/release")
FAKE = os.path.join(BUILD, "tests", "test_http_server")

pytestmark = pytest.mark.skipif(not os.path.exists(FAKE), reason="test_http_server not built")


class Server:
    def __init__(self, *args):
        self.proc = subprocess.Popen([FAKE, "--serve", *args], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        m = re.match(r"port (\d+)", line)
        assert m, "fake rank 0 did not start: %r %s" % (line, self.proc.stderr.read())
        self.port = int(m.group(1))
        self.url = "http://127.0.0.1:%d" % self.port
        self.token = None

    def request(self, method, path, body=None, token=None, raw=None, headers=None):
        tok = token if token is not None else self.token
        return http_request(self.port, method, path, body, tok, raw, headers)

    def wait(self, path, pred, timeout=10):
        deadline = time.monotonic() + timeout
        while True:
            code, obj = self.request("GET", path)
            if code == 200 and pred(obj):
                return obj
            assert time.monotonic() < deadline, "timed out waiting on %s: %s" % (path, obj)
            time.sleep(0.02)

    def register(self, name, path):
        code, obj = self.request("POST", "/v1/checkpoints/%s/files" % name, {"path": path})
        assert code == 202, obj
        return self.wait("/v1/checkpoints/" + name, lambda o: o["state"] != "registering")

    def update(self, name, **body):
        code, obj = self.request("POST", "/v1/checkpoints/%s/update" % name, body)
        assert code == 202, obj
        return obj

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=10)
        assert self.proc.returncode == 0, self.proc.stderr.read()


@pytest.fixture
def srv():
    s = Server("--update-ms", "600")
    yield s
    s.stop()


@pytest.fixture
def model(tmp_path):
    p = tmp_path / "model.safetensors"
    p.write_bytes(b"\0" * 4096)
    return str(p)


def test_healthz_and_empty_list(srv):
    code, obj = srv.request("GET", "/v1/healthz")
    assert code == 200 and obj["status"] == "ok"
    assert srv.request("GET", "/v1/checkpoints") == (200, {"checkpoints": []})


def test_register_get_metas_unregister(srv, model):
    c = srv.register("m1", model)
    assert c["state"] == "ready" and c["bytes"] == 4096 and c["tensors"] == 3
    code, obj = srv.request("GET", "/v1/checkpoints")
    assert [x["name"] for x in obj["checkpoints"]] == ["m1"]
    srv.wait("/v1/checkpoints/m1", lambda o: o["metas_available"])
    code, data = srv.request("GET", "/v1/checkpoints/m1/metas")
    assert code == 200 and data == b"metas-of-m1"
    code, obj = srv.request("POST", "/v1/checkpoints/m1/files", {"path": model})
    assert code == 409 and "already ready" in obj["error"]
    code, obj = srv.request("DELETE", "/v1/checkpoints/m1")
    assert code == 202 and obj["state"] == "unregistering"
    deadline = time.monotonic() + 10
    while srv.request("GET", "/v1/checkpoints/m1")[0] != 404:
        assert time.monotonic() < deadline
        time.sleep(0.02)


def test_register_failure_is_reported(srv, tmp_path):
    c = srv.register("gone", str(tmp_path / "missing"))
    assert c["state"] == "failed" and "no such file" in c["reason"]
    code, obj = srv.request("POST", "/v1/checkpoints/gone/update", {})
    assert code == 409 and "failed" in obj["error"]
    # A failed registration can be retried or forgotten.
    code, obj = srv.request("DELETE", "/v1/checkpoints/gone")
    assert code == 200 and obj["state"] == "removed"


def test_metas_before_export(srv):
    code, obj = srv.request("GET", "/v1/checkpoints/nope/metas")
    assert code == 404 and "no checkpoint named 'nope'" in obj["error"]


@pytest.mark.parametrize("method,path,body,code,field,text", [
    ("POST", "/v1/checkpoints/m/files", {}, 400, "path", "required"),
    ("POST", "/v1/checkpoints/m/files", {"path": 7}, 400, "path", "must be a string"),
    ("POST", "/v1/checkpoints/m/files", {"path": "/x", "extra": 1}, 400, "extra", "unknown field"),
    ("POST", "/v1/checkpoints/m/files", b'{"path": ', 400, None, "malformed JSON"),
    ("POST", "/v1/checkpoints/m/files", b'[1, 2]', 400, None, "JSON object"),
    ("POST", "/v1/checkpoints/bad%20name/files", {"path": "/x"}, 400, "name", "bad checkpoint name"),
    ("POST", "/v1/checkpoints/.hidden/files", {"path": "/x"}, 400, "name", "bad checkpoint name"),
    ("POST", "/v1/checkpoints/unknown/update", {}, 404, None, "no checkpoint named 'unknown'"),
    ("POST", "/v1/checkpoints/unknown/update", {"timeout_ms": "5"}, 400, "timeout_ms", "integer"),
    ("POST", "/v1/checkpoints/unknown/update", {"bucket_max": "big"}, 400, "bucket_max", "size"),
    ("POST", "/v1/checkpoints/unknown/update", {"mode": "x"}, 400, "mode", "broadcast"),
    ("POST", "/v1/checkpoints/unknown/update", {"verify": "yes"}, 400, "verify", "true or false"),
    ("POST", "/v1/checkpoints/unknown/update", {"update_url": "ftp://x"}, 400, "update_url", "http"),
    ("GET", "/v1/checkpoints/unknown", None, 404, None, "no checkpoint named"),
    ("DELETE", "/v1/checkpoints/unknown", None, 404, None, "no checkpoint named"),
    ("GET", "/v1/updates/99", None, 404, None, "no update 99"),
    ("GET", "/v1/updates/abc", None, 400, "id", "positive integer"),
    ("GET", "/v1/updates/99/trace", None, 404, None, "no update 99"),
    ("PUT", "/v1/checkpoints", None, 405, None, "not allowed"),
    ("GET", "/v1/checkpoints/m/update", None, 405, None, "use POST"),
    ("POST", "/v1/healthz", None, 405, None, "use GET"),
    ("DELETE", "/metrics", None, 405, None, "use GET"),
    ("GET", "/v2/anything", None, 404, None, "no such endpoint"),
    ("GET", "/v1/checkpoints/m/nothing", None, 404, None, "no such endpoint"),
])
def test_bad_requests(srv, method, path, body, code, field, text):
    raw = body if isinstance(body, bytes) else None
    got, obj = srv.request(method, path, None if raw else body, raw=raw)
    assert got == code, obj
    assert isinstance(obj, dict) and text in obj["error"], obj
    assert obj.get("field") == field
    assert srv.request("GET", "/v1/healthz")[0] == 200


def test_405_names_allowed_methods(srv):
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=10)
    conn.request("PATCH", "/v1/checkpoints/m")
    resp = conn.getresponse()
    resp.read()
    assert resp.status == 405 and resp.getheader("Allow") == "GET, DELETE"


def test_oversized_body():
    s = Server("--max-body", "1024")
    try:
        code, obj = s.request("POST", "/v1/checkpoints/m/files",
                              raw=json.dumps({"path": "x" * 5000}))
        assert code == 413 and "1024 bytes" in obj["error"]
        assert s.request("GET", "/v1/healthz")[0] == 200
    finally:
        s.stop()


def test_update_progress_409_trace(srv, model):
    srv.register("m", model)
    up = srv.update("m", bucket_max="1MiB", timeout_ms=5000, verify=True)
    assert up["status_url"] == "/v1/updates/%d" % up["update_id"]
    code, obj = srv.request("POST", "/v1/checkpoints/m/update", {})
    assert code == 409 and "one update runs at a time" in obj["error"]
    code, obj = srv.request("DELETE", "/v1/checkpoints/m")
    assert code == 409
    mid = srv.wait(up["status_url"], lambda o: o["state"] == "running"
                   and 0 < o["progress"]["buckets_done"] < o["progress"]["nbuckets"])
    p = mid["progress"]
    assert p["nbuckets"] == 10 and p["bytes_total"] == 10 << 20
    assert p["rate_bytes_per_s"] > 0 and p["eta_s"] is not None
    code, obj = srv.request("GET", up["status_url"] + "/trace")
    assert code == 409 and "running" in obj["error"]
    done = srv.wait(up["status_url"], lambda o: o["state"] in ("succeeded", "failed"))
    assert done["state"] == "succeeded", done
    assert done["failed_rank"] == -1 and done["buckets"] == 10 and done["ranks"] == 2
    assert done["progress"]["buckets_done"] == 10 and done["progress"]["eta_s"] is None
    assert set(done["timings"]) == {"gather_s", "plan_s", "begin_s", "pipeline_s",
                                    "finish_s", "total_s"}
    code, trace = srv.request("GET", done["trace_url"])
    assert code == 200 and trace["traceEvents"][0]["name"] == "update"
    assert srv.request("GET", "/v1/checkpoints/m")[1]["version"] == 2
    # The next update is accepted once this one ended.
    srv.update("m")


def test_failed_update_names_rank(srv, model):
    srv.register("fail-update", model)
    up = srv.update("fail-update")
    done = srv.wait(up["status_url"], lambda o: o["state"] in ("succeeded", "failed"))
    assert done["state"] == "failed" and done["failed_rank"] == 1
    assert "worker disconnected" in done["reason"] and done["status_name"] == "CKPT_EPEER"


def test_token(model):
    s = Server("--token", "tok-123")
    try:
        assert s.request("GET", "/v1/healthz")[0] == 200  # open for liveness probes
        code, obj = s.request("GET", "/v1/checkpoints")
        assert code == 401 and "Authorization" in obj["error"]
        code, obj = s.request("GET", "/v1/checkpoints", token="tok-12")
        assert code == 401 and "wrong bearer token" in obj["error"]
        code, obj = s.request("GET", "/metrics", token="tok-1234")
        assert code == 401
        s.token = "tok-123"
        assert s.request("GET", "/v1/checkpoints")[0] == 200
        assert s.register("m", model)["state"] == "ready"
    finally:
        s.stop()


class Recorder(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.server.requests.append((self.path, self.headers.get("Content-Type"),
                                     json.loads(body)))
        reply = b'{"results": [null, null]}' if self.status == 200 else b"boom: worker crashed"
        self.send_response(self.status)
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, *args):
        pass


def start_recorder(status):
    handler = type("H", (Recorder,), {"status": status})
    httpd = http.server.HTTPServer(("127.0.0.1", 0), handler)
    httpd.requests = []
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd


def test_trigger_shape(srv, model):
    rec = start_recorder(200)
    try:
        srv.register("m", model)
        url = "http://127.0.0.1:%d/collective_rpc" % rec.server_address[1]
        up = srv.update("m", update_url=url)
        done = srv.wait(up["status_url"], lambda o: o["state"] in ("succeeded", "failed"))
        assert done["state"] == "succeeded", done
        assert done["trigger"] is True
        assert len(rec.requests) == 1
        path, ctype, body = rec.requests[0]
        assert path == "/collective_rpc" and ctype == "application/json"
        assert body["method"] == "update_weights_from_ckpt_engine" and body["args"] == []
        kw = body["kwargs"]
        assert kw["socket_paths"] == {"0": "/tmp/ckpt-fake/rank-0.sock",
                                      "1": "/tmp/ckpt-fake/rank-1.sock"}
        assert kw["update_id"] == up["update_id"] and kw["name"] == "m" and kw["version"] == 2
        assert body["timeout"] == 5.0
        up = srv.update("m", update_url=url, trigger_method="my_ext.attach")
        srv.wait(up["status_url"], lambda o: o["state"] == "succeeded")
        assert rec.requests[1][2]["method"] == "my_ext.attach"
    finally:
        rec.shutdown()


def test_trigger_failures_fail_the_update(srv, model):
    rec = start_recorder(500)
    try:
        srv.register("m", model)
        url = "http://127.0.0.1:%d/collective_rpc" % rec.server_address[1]
        up = srv.update("m", update_url=url)
        done = srv.wait(up["status_url"], lambda o: o["state"] in ("succeeded", "failed"))
        assert done["state"] == "failed" and "HTTP 500" in done["reason"]
        assert "boom: worker crashed" in done["reason"]
    finally:
        rec.shutdown()
    up = srv.update("m", update_url=url)  # nothing listens there any more
    done = srv.wait(up["status_url"], lambda o: o["state"] in ("succeeded", "failed"))
    assert done["state"] == "failed" and url in done["reason"]


METRIC_LINE = re.compile(
    r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{([a-zA-Z_][a-zA-Z0-9_]*="[^"\\]*"'
    r'(,[a-zA-Z_][a-zA-Z0-9_]*="[^"\\]*")*)?\})? (-?[0-9.eE+-]+|\+Inf|NaN)$')


def parse_metrics(text):
    samples, types = {}, {}
    for line in text.splitlines():
        if not line:
            continue
        if line.startswith("#"):
            parts = line.split()
            assert parts[1] in ("HELP", "TYPE"), line
            if parts[1] == "TYPE":
                assert parts[3] in ("counter", "gauge", "histogram", "summary"), line
                types[parts[2]] = parts[3]
            continue
        m = METRIC_LINE.match(line)
        assert m, "not Prometheus text: %r" % line
        samples[line.rsplit(" ", 1)[0]] = float(m.group(5))
        base = re.sub(r"_(bucket|sum|count)$", "", m.group(1))
        assert m.group(1) in types or base in types, "no TYPE for %s" % line
    return samples


def test_metrics(srv, model):
    srv.register("m", model)
    up = srv.update("m")
    srv.wait(up["status_url"], lambda o: o["state"] == "succeeded")
    srv.request("GET", "/v1/nothing")
    code, text = srv.request("GET", "/metrics")
    assert code == 200
    s = parse_metrics(text.decode())
    assert s['ckpt_updates_total{result="ok"}'] == 1
    assert s['ckpt_updates_total{result="failed"}'] == 0
    assert s["ckpt_update_bytes_total"] == 10 << 20
    assert s["ckpt_registered_checkpoints"] == 1 and s["ckpt_registered_bytes"] == 4096
    assert s['ckpt_update_duration_seconds_bucket{le="+Inf"}'] == 1
    assert s["ckpt_update_duration_seconds_count"] == 1
    assert s['ckpt_http_requests_total{code="404"}'] >= 1
    assert s['ckpt_http_requests_total{code="202"}'] == 2


def cli(srv, *args, token_file=None):
    cmd = [FAKE, "--client", *args, "--server", srv.url]
    if token_file:
        cmd += ["--token-file", token_file]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


def test_cli(srv, model, tmp_path):
    r = cli(srv, "register", "m", model, "--wait")
    assert r.returncode == 0 and "'m' ready" in r.stdout, r.stderr
    r = cli(srv, "list")
    assert r.returncode == 0 and re.search(r"^m\s+ready", r.stdout, re.M)
    r = cli(srv, "update", "m", "--bucket-max", "1MiB", "--timeout-ms", "5000", "--verify",
            "--wait")
    assert r.returncode == 0, r.stderr
    assert "bucket 10/10" in r.stdout and "succeeded" in r.stdout
    r = cli(srv, "status", "1")
    assert r.returncode == 0 and json.loads(r.stdout)["state"] == "succeeded"
    out = tmp_path / "metas.bin"
    r = cli(srv, "metas", "m", "-o", str(out))
    assert r.returncode == 0 and out.read_bytes() == b"metas-of-m"
    r = cli(srv, "update", "m", "--bucket-max", "huge")
    assert r.returncode == 1 and "field 'bucket_max'" in r.stderr and "HTTP 400" in r.stderr
    r = cli(srv, "register", "fail-update", model, "--wait")
    r = cli(srv, "update", "fail-update", "--wait")
    assert r.returncode == 1 and "failed on rank 1" in r.stderr
    assert "worker disconnected" in r.stderr
    r = cli(srv, "unregister", "m")
    assert r.returncode == 0 and "unregistering" in r.stdout
    r = cli(srv, "unregister", "nothing")
    assert r.returncode == 1 and "no checkpoint named 'nothing'" in r.stderr


def test_cli_token_and_unreachable(tmp_path):
    s = Server("--token", "abc")
    try:
        r = cli(s, "list")
        assert r.returncode == 1 and "HTTP 401" in r.stderr and "--token-file" in r.stderr
        tf = tmp_path / "token"
        tf.write_text("abc\n")
        assert cli(s, "list", token_file=str(tf)).returncode == 0
        url = s.url
    finally:
        s.stop()
    r = subprocess.run([FAKE, "--client", "list", "--server", url], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 1 and "cannot reach " + url in r.stderr
    assert "connection refused" in r.stderr and "ckpt-engine serve --http" in r.stderr
