"""HTTP control API against a fake rank 0 (test_http_server --serve): every endpoint, bad
requests, auth, one update at a time, progress, traces, the inference-server trigger and
the Prometheus text. Real processes on ephemeral ports; polling, never fixed sleeps."""
import http.client
import http.server
import json
import os
import re
import socketserver
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
    # a NUL would cut the path and register another file; a key given twice would let the
    # last one win behind a proxy that checked the first
    ("POST", "/v1/checkpoints/m/files", b'{"path": "/a/b\\u0000.safetensors"}', 400, "path", "NUL"),
    ("POST", "/v1/checkpoints/m/files", b'{"files": ["/a", "/b\\u0000"]}', 400, "files", "NUL"),
    ("POST", "/v1/checkpoints/m/files", b'{"pa\\u0000th": "/a"}', 400, "pa", "NUL"),
    ("POST", "/v1/checkpoints/m/files", b'{"path": "/a", "path": "/etc/x"}', 400, "path", "twice"),
    ("POST", "/v1/checkpoints/unknown/update",
     b'{"update_url": "http://a/collective_rpc\\u0000x"}', 400, "update_url", "NUL"),
    ("POST", "/v1/checkpoints/unknown/update", b'{"verify": true, "verify": false}', 400,
     "verify", "twice"),
    ("POST", "/v1/checkpoints/m/gather-metas", b'{"timeout": 1, "timeout": 2}', 400, "timeout",
     "twice"),
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


class FakeVllm:
    """A stand-in vLLM OpenAI server (VLLM_SERVER_DEV_MODE=1): POST /pause?mode=..,
    /resume and /collective_rpc, recorded in arrival order with their bodies. On TCP, or on
    a Unix socket (uds=PATH: checkpoint-engine's trigger over a socket)."""

    def __init__(self, rpc_status=200, pause_status=200, results=None, uds=None,
                 pause_delay=0.0, reset_status=200):
        self.calls = []      # request paths (with the query) in arrival order
        self.bodies = {}     # path -> parsed JSON body (the last one)
        self.times = {}      # path -> (arrived, answered) monotonic seconds
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                arrived = time.monotonic()
                n = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(n)
                fake.calls.append(self.path)
                fake.bodies[self.path] = json.loads(raw) if raw else None
                route = self.path.split("?")[0]
                if route == "/pause":
                    time.sleep(pause_delay)
                    status, reply = pause_status, {"status": "paused"}
                    if pause_status == 404:
                        reply = {"detail": "Not Found"}
                elif route == "/resume":
                    status, reply = 200, {"status": "resumed"}
                elif route == "/reset_prefix_cache":
                    status, reply = reset_status, {"detail": "reset" if reset_status == 200
                                                   else "Not Found"}
                elif route == "/collective_rpc":
                    status = rpc_status
                    reply = ({"results": results if results is not None else [None, None]}
                             if rpc_status == 200 else "boom: worker crashed")
                else:
                    status, reply = 404, {"detail": "Not Found"}
                data = (json.dumps(reply) if not isinstance(reply, str) else reply).encode()
                # Answered = before the reply leaves: once it is written the client may send
                # its next request, which another thread records first (a flaky ordering
                # check in test_trigger_waits_for_pause when taken after the write).
                fake.times[self.path] = (arrived, time.monotonic())
                self.send_response(status)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        if uds:
            class UnixHTTPServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
                daemon_threads = True
            self.httpd = UnixHTTPServer(uds, Handler)
            self.base = "http://localhost"
        else:
            self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
            self.base = "http://127.0.0.1:%d" % self.httpd.server_address[1]
        self.url = self.base + "/collective_rpc"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def vllm():
    fakes = []

    def make(**kw):
        fakes.append(FakeVllm(**kw))
        return fakes[-1]
    yield make
    for f in fakes:
        f.close()


def ended(srv, up):
    return srv.wait(up["status_url"], lambda o: o["state"] in ("succeeded", "failed"))


def test_trigger_shape(srv, model, vllm):
    fake = vllm()
    srv.register("m", model)
    up = srv.update("m", update_url=fake.url)
    done = ended(srv, up)
    assert done["state"] == "succeeded", done
    assert done["trigger"] is True and done["paused"] is True and done["resumed"] is True
    # Paused (draining in-flight requests) before the trigger, resumed after the update.
    assert fake.calls == ["/pause?mode=wait", "/collective_rpc", "/reset_prefix_cache",
                          "/resume"]
    body = fake.bodies["/collective_rpc"]
    assert body["method"] == "ckpt_engine_update" and body["args"] == []
    kw = body["kwargs"]
    assert kw["socket_paths"] == {"0": "/tmp/ckpt-fake/rank-0.sock",
                                  "1": "/tmp/ckpt-fake/rank-1.sock"}
    assert kw["update_id"] == up["update_id"] and kw["name"] == "m" and kw["version"] == 2
    assert kw["timeout_s"] == 5.0 and body["timeout"] == 5.0
    up = srv.update("m", update_url=fake.url, trigger_method="my_ext.attach", pause="off")
    assert ended(srv, up)["state"] == "succeeded"
    assert fake.calls[4:] == ["/collective_rpc"]  # "off": no pause, no resume
    assert fake.bodies["/collective_rpc"]["method"] == "my_ext.attach"


def test_prefix_cache_reset_before_resume(srv, model, vllm):
    """KV blocks of the old weights must not serve new requests: vLLM's prefix cache is reset
    after the update, before it resumes. After a keep-mode pause (which does not clear the
    cache) a refused reset leaves vLLM paused, naming what to do; after wait it is a note."""
    srv.register("m", model)
    fake = vllm(reset_status=404)
    done = ended(srv, srv.update("m", update_url=fake.url, pause="keep"))
    assert done["state"] == "failed" and done["paused"] and not done["resumed"], done
    assert fake.calls == ["/pause?mode=keep", "/collective_rpc", "/reset_prefix_cache"]
    assert "prefix cache holds blocks of the old weights" in done["reason"], done
    assert "/reset_prefix_cache, then" in done["reason"], done
    fake2 = vllm(reset_status=404)
    done = ended(srv, srv.update("m", update_url=fake2.url))
    assert done["state"] == "succeeded" and done["resumed"], done
    assert fake2.calls == ["/pause?mode=wait", "/collective_rpc", "/reset_prefix_cache",
                           "/resume"]


def test_trigger_waits_for_pause(srv, model, vllm):
    """pause=wait drains in-flight requests: the trigger only goes once vLLM answered."""
    fake = vllm(pause_delay=0.5)
    srv.register("m", model)
    done = ended(srv, srv.update("m", update_url=fake.url, pause="abort"))
    assert done["state"] == "succeeded", done
    assert fake.calls == ["/pause?mode=abort", "/collective_rpc", "/reset_prefix_cache",
                          "/resume"]
    assert fake.times["/collective_rpc"][0] >= fake.times["/pause?mode=abort"][1]
    assert fake.times["/resume"][0] >= fake.times["/collective_rpc"][1]


def test_failed_update_leaves_vllm_paused(srv, model, vllm):
    fake = vllm()
    srv.register("fail-update", model)
    done = ended(srv, srv.update("fail-update", update_url=fake.url))
    assert done["state"] == "failed" and done["failed_rank"] == 1
    assert fake.calls == ["/pause?mode=wait", "/collective_rpc"]  # no /resume
    assert done["paused"] is True and done["resumed"] is False
    assert "worker disconnected" in done["reason"]
    assert ("vLLM at %s left paused: the update failed; POST %s/resume after a good update"
            % (fake.base, fake.base)) in done["reason"]


@pytest.mark.parametrize("kw,text", [
    (dict(rpc_status=500), "HTTP 500: boom: worker crashed"),
    (dict(results=[{"completed": True}, {"completed": False, "reason": "engine aborted"}]),
     "worker 1 did not complete the update: engine aborted"),
])
def test_trigger_failure_leaves_vllm_paused(srv, model, vllm, kw, text):
    fake = vllm(**kw)
    srv.register("m", model)
    done = ended(srv, srv.update("m", update_url=fake.url))
    assert done["state"] == "failed" and text in done["reason"], done
    assert fake.url in done["reason"] and "left paused" in done["reason"]
    assert fake.calls == ["/pause?mode=wait", "/collective_rpc"]
    assert done["paused"] is True and done["resumed"] is False


def test_pause_refused_fails_before_trigger(srv, model, vllm):
    fake = vllm(pause_status=404)
    srv.register("m", model)
    done = ended(srv, srv.update("m", update_url=fake.url))
    assert done["state"] == "failed", done
    assert fake.calls == ["/pause?mode=wait"]  # no trigger, nothing moved
    assert '"pause": "off"' in done["reason"] and "HTTP 404" in done["reason"]
    assert done["paused"] is False and done["bytes"] == 0
    # pause "off" is the way through for a vLLM without pause/resume.
    done = ended(srv, srv.update("m", update_url=fake.url, pause="off"))
    assert done["state"] == "succeeded" and fake.calls[1:] == ["/collective_rpc"]
    assert done["paused"] is False


def test_trigger_to_other_servers_does_not_pause(srv, model, vllm):
    fake = vllm()
    srv.register("m", model)
    done = ended(srv, srv.update("m", update_url=fake.base + "/my_update"))
    # Not vLLM's collective_rpc: POSTed as is, no pause or resume around it.
    assert fake.calls == ["/my_update"] and done["paused"] is False


def test_inference_group_ranks_and_ranks(model, vllm):
    s = Server("--update-ms", "200", "--ranks", "4")
    try:
        s.register("m", model)
        a, b = vllm(), vllm()
        # Two vLLM instances served by one engine deployment each get their own ranks.
        for fake, group in ((a, [0, 1]), (b, [3, 2])):
            done = ended(s, s.update("m", update_url=fake.url, inference_group_ranks=group,
                                     ranks=[0, 1, 2, 3]))
            assert done["state"] == "succeeded", done
            assert fake.bodies["/collective_rpc"]["kwargs"]["socket_paths"] == {
                str(i): "/tmp/ckpt-fake/rank-%d.sock" % r for i, r in enumerate(group)}
        code, obj = s.request("POST", "/v1/checkpoints/m/update",
                              {"update_url": a.url, "inference_group_ranks": [1, 4]})
        assert code == 400 and obj["field"] == "inference_group_ranks", obj
        assert "engine has 4 ranks" in obj["error"]
        code, obj = s.request("POST", "/v1/checkpoints/m/update", {"ranks": [0, 1]})
        assert code == 400 and obj["field"] == "ranks" and "not supported yet" in obj["error"]
        code, obj = s.request("POST", "/v1/checkpoints/m/update", {"ranks": [0, 9]})
        assert code == 400 and obj["field"] == "ranks" and "names rank 9" in obj["error"]
    finally:
        s.stop()


def test_trigger_over_unix_socket(srv, model, vllm, tmp_path):
    sock = str(tmp_path / "vllm.sock")
    fake = vllm(uds=sock)
    srv.register("m", model)
    up = srv.update("m", update_url="http://localhost/collective_rpc", uds=sock)
    done = ended(srv, up)
    assert done["state"] == "succeeded", done
    assert fake.calls == ["/pause?mode=wait", "/collective_rpc", "/reset_prefix_cache",
                          "/resume"]
    assert done["resumed"] is True
    # Nobody on the socket: the reason names it.
    fake.close()
    os.unlink(sock)
    done = ended(srv, srv.update("m", update_url="http://localhost/collective_rpc", uds=sock,
                                 pause="off"))
    assert done["state"] == "failed" and "over Unix socket " + sock in done["reason"], done


def test_trigger_unreachable(srv, model):
    srv.register("m", model)
    url = "http://127.0.0.1:1/collective_rpc"  # nothing listens there
    done = ended(srv, srv.update("m", update_url=url, timeout_ms=3000))
    assert done["state"] == "failed" and "http://127.0.0.1:1/pause?mode=wait" in done["reason"]
    assert "nothing was sent to the workers" in done["reason"]
    done = ended(srv, srv.update("m", update_url=url, pause="off", timeout_ms=3000))
    assert done["state"] == "failed" and url in done["reason"]


def test_checkpoint_engine_register_and_gather_metas(srv, tmp_path):
    files = []
    for i in range(3):
        p = tmp_path / ("model-%05d.safetensors" % i)
        p.write_bytes(b"\0" * (1000 * (i + 1)))
        files.append(str(p))
    code, obj = srv.request("POST", "/v1/checkpoints/ce/files", {"files": files})
    assert code == 202 and obj["state"] == "registering", obj
    # gather-metas waits for the registration, as checkpoint-engine's collective does.
    code, obj = srv.request("POST", "/v1/checkpoints/ce/gather-metas")
    assert code == 200 and obj["state"] == "ready", obj
    assert obj["bytes"] == 6000 and obj["tensors"] == 3 and obj["ranks"] == 2
    assert obj["metas_url"] == "/v1/checkpoints/ce/metas"
    code, obj = srv.request("POST", "/v1/checkpoints/ce/gather-metas", {"timeout": 1})
    assert code == 200
    code, obj = srv.request("POST", "/v1/checkpoints/nope/gather-metas")
    assert code == 404 and "no checkpoint named 'nope'" in obj["error"]
    bad = srv.register("gone", files[0] + ".missing")
    assert bad["state"] == "failed"
    code, obj = srv.request("POST", "/v1/checkpoints/gone/gather-metas")
    assert code == 409 and "failed" in obj["error"] and "no such file" in obj["error"]
    code, obj = srv.request("GET", "/v1/checkpoints/ce/gather-metas")
    assert code == 405
    # checkpoint-engine's update body, with its defaults spelled out.
    code, obj = srv.request("POST", "/v1/checkpoints/ce/update",
                            {"ranks": [], "update_url": None, "inference_group_ranks": [],
                             "timeout": 300.0, "uds": None})
    assert code == 202, obj
    assert ended(srv, obj)["state"] == "succeeded"
    code, obj = srv.request("DELETE", "/v1/checkpoints/ce")
    assert code == 202


@pytest.mark.parametrize("path,body,field,text", [
    ("files", {"files": []}, "files", "non-empty array"),
    ("files", {"files": ["/a.safetensors", "/b"]}, "files", ".safetensors file"),
    ("files", {"files": ["/a.safetensors", "/a.safetensors"]}, "files", "twice"),
    ("files", {"files": ["/a.safetensors"], "path": "/a"}, "files", "not both"),
    ("gather-metas", {"timeout": "x"}, "timeout", "seconds"),
    ("gather-metas", {"bogus": 1}, "bogus", "unknown field"),
    ("update", {"timeout": 5, "timeout_ms": 5000}, "timeout", "not both"),
    ("update", {"timeout": -1}, "timeout", "seconds"),
    ("update", {"uds": "rel.sock", "update_url": "http://localhost/collective_rpc"}, "uds",
     "absolute"),
    ("update", {"uds": "/x.sock"}, "uds", "needs an update_url"),
    ("update", {"inference_group_ranks": [0, 0], "update_url": "http://h/collective_rpc"},
     "inference_group_ranks", "twice"),
    ("update", {"inference_group_ranks": [0]}, "inference_group_ranks", "needs an update_url"),
    ("update", {"pause": "never"}, "pause", '"wait", "abort", "keep" or "off"'),
    ("update", {"pause": "wait", "update_url": "http://h/x"}, "pause", "/collective_rpc"),
    ("update", {"ranks": "all"}, "ranks", "array"),
])
def test_checkpoint_engine_shapes_bad(srv, path, body, field, text):
    code, obj = srv.request("POST", "/v1/checkpoints/m/" + path, body)
    assert code == 400 and obj["field"] == field and text in obj["error"], obj


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


def test_cli_vllm_and_files(srv, model, vllm, tmp_path):
    fake = vllm()
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    a.write_bytes(b"\0" * 100)
    b.write_bytes(b"\0" * 200)
    r = cli(srv, "register", "two", str(a), str(b), "--wait")
    assert r.returncode == 0 and "'two' ready: 300 B" in r.stdout, r.stdout + r.stderr
    r = cli(srv, "update", "two", "--update-url", fake.url, "--pause", "keep", "--wait")
    assert r.returncode == 0 and "vLLM paused for it, resumed" in r.stdout, r.stdout + r.stderr
    assert fake.calls == ["/pause?mode=keep", "/collective_rpc", "/reset_prefix_cache",
                          "/resume"]
    r = cli(srv, "update", "two", "--update-url", fake.url, "--pause", "off",
            "--inference-group-ranks", "1,0", "--wait")
    assert r.returncode == 0, r.stderr
    assert fake.calls[4:] == ["/collective_rpc"]
    assert fake.bodies["/collective_rpc"]["kwargs"]["socket_paths"]["0"].endswith("rank-1.sock")
    r = cli(srv, "register", "fail-update", model, "--wait")
    r = cli(srv, "update", "fail-update", "--update-url", fake.url, "--wait")
    assert r.returncode == 1 and "left paused" in r.stderr, r.stderr
    r = cli(srv, "update", "two", "--pause", "maybe")
    assert r.returncode == 1 and "field 'pause'" in r.stderr


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


# ---- abuse: slow clients, per-address limit ------------------------------------------

def _raise_fd_limit(n):
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < n:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(n, hard), hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0] >= n


def _slow_client(port, source):
    """A connection from `source` (another loopback address) that has sent a request line
    and no end of headers."""
    import socket
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind((source, 0))
    s.settimeout(5)
    s.connect(("127.0.0.1", port))
    s.sendall(b"GET /v1/healthz HTTP/1.1\r\nHost: x\r\n")
    return s


def _closed_by_server(s):
    """True when the server closed s: end of file (after an optional 408) or a reset."""
    import socket
    s.setblocking(False)
    try:
        while True:
            data = s.recv(4096)
            if data == b"":
                return True
            if not data.startswith(b"HTTP/1.1 408") and b"408" not in data:
                return False
    except BlockingIOError:
        return False
    except (ConnectionResetError, BrokenPipeError):
        return True
    except socket.error:
        return True


def test_slow_clients_cannot_starve_healthz():
    """300 clients from 300 other loopback addresses trickle a header line every 2 s (each
    line resets an idle timeout): healthz from 127.0.0.1 answers within 1 s throughout, and
    the server drops every slow client once the request deadline (3 s here) passes."""
    import socket
    nslow, bound = 300, 3.0
    if not _raise_fd_limit(nslow * 2 + 256):
        pytest.skip("cannot raise the open-file limit for 300 sockets")
    s = Server("--request-timeout", str(bound))  # the fake inherits our fd limit
    slow, born = [], []
    worst = 0.0
    try:
        for i in range(nslow):
            src = "127.0.%d.%d" % (1 + i // 250, 2 + i % 250)
            slow.append(_slow_client(s.port, src))
            born.append(time.monotonic())

        def healthz():
            t = time.monotonic()
            code, obj = http_request(s.port, "GET", "/v1/healthz")
            dt = time.monotonic() - t
            assert code == 200 and obj["status"] == "ok"
            assert dt < 1.0, "healthz took %.2f s with %d slow clients" % (dt, len(slow))
            return dt

        start = time.monotonic()
        next_trickle = start
        open_ = set(range(nslow))
        while open_ and time.monotonic() - start < bound + 6:
            worst = max(worst, healthz())
            if time.monotonic() >= next_trickle:
                next_trickle += 2.0
                for i in list(open_):
                    try:
                        slow[i].sendall(b"X-Slow: %d\r\n" % i)
                    except OSError:
                        pass  # the server closed it: checked below
            for i in list(open_):
                if _closed_by_server(slow[i]):
                    # dropped after the bound, not before, and within bound + slack
                    age = time.monotonic() - born[i]
                    assert age >= bound - 0.2, "client %d dropped after %.2f s" % (i, age)
                    open_.discard(i)
            time.sleep(0.05)
        assert not open_, "%d slow clients still connected %.1f s after the deadline" % (
            len(open_), time.monotonic() - start - bound)
        worst = max(worst, healthz())
        code, text = http_request(s.port, "GET", "/metrics", decode=True)
        assert 'ckpt_http_requests_total{code="408"}' in text
        print("healthz worst latency with %d slow clients: %.3f s" % (nslow, worst))
    finally:
        for c in slow:
            c.close()
        s.stop()


def test_per_address_connection_limit():
    """One address holds at most --per-ip connections; the next is refused at once while
    another address still gets in."""
    import socket
    s = Server("--per-ip", "4", "--request-timeout", "20")
    held = []
    try:
        for _ in range(4):
            held.append(_slow_client(s.port, "127.0.0.9"))
        time.sleep(0.2)  # the server has accepted them
        extra = _slow_client(s.port, "127.0.0.9")
        extra.settimeout(3)
        try:
            got = extra.recv(100)
        except (ConnectionResetError, BrokenPipeError):
            got = b""
        assert got == b"", "a 5th connection from one address was served: %r" % got
        extra.close()
        for c in held:  # still open: the limit refused the new one, not the old ones
            c.setblocking(False)
            with pytest.raises(BlockingIOError):
                c.recv(1)
        code, obj = s.request("GET", "/v1/healthz")  # 127.0.0.1 is not limited by them
        assert code == 200
    finally:
        for c in held:
            c.close()
        s.stop()


# ---- exposure: beyond loopback only with a token ---------------------------------------

ENGINE = os.path.join(BUILD, "tools", "ckpt-engine")


def _serve(*args):
    """Starts the real `ckpt-engine serve --http ...` (a singleton MPI rank); returns the
    process once it listens, or once it exited."""
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    p = subprocess.Popen([ENGINE, "serve", *args], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=env)
    line = p.stdout.readline()  # "http: listening on ..." or EOF when it refused
    return p, line


def _stop(p):
    p.terminate()
    out, err = p.communicate(timeout=30)
    return err


@pytest.mark.skipif(not os.path.exists(ENGINE), reason="ckpt-engine not built")
def test_non_loopback_without_token_is_refused(tmp_path):
    for listen in ["0.0.0.0:0", "[::]:0", "192.0.2.1:0"]:
        p, line = _serve("--http", listen)
        err = p.communicate(timeout=30)[1]
        assert p.returncode == 2 and line == "", (listen, line, err)
        assert "--token-file" in err and "--insecure-no-token" in err, err
    # loopback needs no token, nor does a token-protected wildcard
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    for args in (["--http", "127.0.0.2:0"], ["--http", "localhost:0"], ["--http", "[::1]:0"],
                 ["--http", "0.0.0.0:0", "--token-file", str(token)]):
        p, line = _serve(*args)
        err = _stop(p)
        assert line.startswith("http: listening on"), (args, line, err)
        assert "warning" not in err, err
    # asked for explicitly: it listens, with a warning
    p, line = _serve("--http", "0.0.0.0:0", "--insecure-no-token")
    err = _stop(p)
    assert line.startswith("http: listening on http://0.0.0.0:"), (line, err)
    assert "warning" in err and "--insecure-no-token" in err, err
    p, line = _serve("--http", "0", "--http-request-timeout", "0")
    err = p.communicate(timeout=30)[1]
    assert p.returncode == 2 and "--http-request-timeout" in err, err
