"""ckpt-worker command line: --help documents every option; bad arguments are refused."""
import os
import subprocess

import pytest

BUILD = os.environ.get("CKPT_BUILD_DIR", "build/release")
WORKER = os.path.join(BUILD, "tools", "ckpt-worker")
pytestmark = pytest.mark.skipif(not os.path.exists(WORKER), reason="ckpt-worker not built")


def test_help_lists_every_option():
    out = subprocess.run([WORKER, "--help"], capture_output=True, text=True, check=True).stdout
    for opt in ["--socket", "--layout", "--tp-rank", "--tp-size", "--verify", "--checksum-out",
                "--dump", "--timeout-ms", "--updates", "--post-hook-sleep-ms",
                "--fail-on-bucket", "--stall-on-bucket", "--engine-wait-ms", "--declare-need",
                "--need-glob", "--ep-rank", "--ep-size"]:
        assert opt in out, opt


def test_bad_arguments():
    assert subprocess.run([WORKER], capture_output=True).returncode == 2
    r = subprocess.run([WORKER, "--socket", "/tmp/x", "--tp-rank", "2", "--tp-size", "2"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "--tp-rank 2" in r.stderr
    r = subprocess.run([WORKER, "--socket", "/tmp/x", "--layout", "/tmp/x", "--ep-rank", "2",
                        "--ep-size", "2"], capture_output=True, text=True)
    assert r.returncode == 2 and "--ep-rank 2 outside 0..1" in r.stderr, r.stderr
    for opt in (["--declare-need"], ["--need-glob", "*"], ["--ep-size", "2"]):  # nothing to declare without one
        r = subprocess.run([WORKER, "--socket", "/tmp/x"] + opt, capture_output=True, text=True)
        assert r.returncode == 2 and "need --layout" in r.stderr, r.stderr
    r = subprocess.run([WORKER, "--socket", "/tmp/x", "--layout", "/tmp/x"] +
                       ["--need-glob", "*"] * 9, capture_output=True, text=True)
    assert r.returncode == 2 and "at most 8 --need-glob" in r.stderr, r.stderr


def test_no_engine_times_out(tmp_path):
    """Only with a bounded --engine-wait-ms: the default waits for an engine forever."""
    r = subprocess.run([WORKER, "--socket", str(tmp_path / "none.sock"), "--engine-wait-ms",
                        "1500", "--updates", "1"], capture_output=True, text=True, timeout=20)
    assert r.returncode == 1 and "no engine" in r.stderr and "within 1500 ms" in r.stderr
    assert "waiting for an engine at" in r.stderr  # logged after 1 s of waiting
