"""Shared pytest fixtures: where the build is and how to run its programs.

CTest sets CKPT_BUILD_DIR and CKPT_SOURCE_DIR; run by hand, they default to build/release
of this checkout. CKPT_SANITIZE=ON means the binaries are the ASan/UBSan ones (slower).

Under CTest (CKPT_BUILD_DIR set) a skip is a failure: a missing build product or Python
package must not turn a test green. Only the skips in SANCTIONED_SKIPS stay skips (things a
build machine may lack by design: torch). Run by hand, skips stay skips with their reason.

Marker `ctypes`: the test loads libckpt.so into this python (ctypes), so it cannot run
against the ASan/UBSan tree; that tree's `python-mpi` case deselects them (-m "not ctypes").
When CKPT_ASAN_LOG_DIR is set (that case), the sanitizer reports of every process the tests
started land there, and any report fails the session.
"""
import os
import pathlib
import re
import subprocess

import pytest

SOURCE_DIR = pathlib.Path(os.environ.get("CKPT_SOURCE_DIR",
                                         pathlib.Path(__file__).resolve().parents[2]))
BUILD_DIR = pathlib.Path(os.environ.get("CKPT_BUILD_DIR", SOURCE_DIR / "build" / "release"))
SANITIZED = os.environ.get("CKPT_SANITIZE", "").upper() in ("ON", "1", "TRUE", "YES")
UNDER_CTEST = "CKPT_BUILD_DIR" in os.environ
ASAN_LOG_DIR = os.environ.get("CKPT_ASAN_LOG_DIR")

# Skip reasons that stay skips under CTest (regular expressions, searched in the reason).
SANCTIONED_SKIPS = [r"torch is not importable"]


def _sanctioned(reason):
    return any(re.search(p, reason) for p in SANCTIONED_SKIPS)


def _skip_reason(report):
    lr = report.longrepr
    if isinstance(lr, tuple) and len(lr) == 3:
        return str(lr[2])
    return str(lr)


def _fail_unsanctioned_skip(report):
    if UNDER_CTEST and report.skipped and not hasattr(report, "wasxfail"):
        reason = _skip_reason(report)
        if not _sanctioned(reason):
            report.outcome = "failed"
            report.longrepr = ("skipped under CTest, which counts as a failure (a missing build "
                               "product or package must not pass): " + reason)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    _fail_unsanctioned_skip(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    _fail_unsanctioned_skip(outcome.get_result())


def pytest_configure(config):
    config.addinivalue_line("markers", "ctypes: loads libckpt.so into this python (not in "
                            "the ASan/UBSan tree)")
    config.addinivalue_line("markers", "asan_slow: too slow for the ASan/UBSan tree's run")
    if ASAN_LOG_DIR:
        os.makedirs(ASAN_LOG_DIR, exist_ok=True)
        for name in os.listdir(ASAN_LOG_DIR):  # reports of an earlier run
            os.unlink(os.path.join(ASAN_LOG_DIR, name))


def pytest_sessionfinish(session, exitstatus):
    if not ASAN_LOG_DIR or not os.path.isdir(ASAN_LOG_DIR):
        return
    reports = sorted(os.listdir(ASAN_LOG_DIR))
    if reports:
        for name in reports[:5]:
            with open(os.path.join(ASAN_LOG_DIR, name), errors="replace") as f:
                print("\n==== sanitizer report %s ====\n%s" % (name, f.read()[-6000:]))
        print("%d sanitizer report(s) under %s" % (len(reports), ASAN_LOG_DIR))
        session.exitstatus = 1


@pytest.fixture(scope="session")
def build_dir():
    """The CMake build tree under test."""
    if not BUILD_DIR.is_dir():
        pytest.skip(f"no build tree at {BUILD_DIR}")
    return BUILD_DIR


@pytest.fixture(scope="session")
def ckpt_engine(build_dir):
    """Path of the ckpt-engine binary."""
    path = build_dir / "tools" / "ckpt-engine"
    if not path.is_file():
        pytest.skip(f"ckpt-engine not built at {path}")
    return path


@pytest.fixture(scope="session")
def run_tool(ckpt_engine):
    """run_tool(*args, check=True) -> CompletedProcess of `ckpt-engine args...` (text)."""
    def run(*args, check=True, timeout=300):
        proc = subprocess.run([str(ckpt_engine), *map(str, args)], capture_output=True,
                              text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"ckpt-engine {' '.join(map(str, args))} exited "
                                 f"{proc.returncode}:\n{proc.stderr}")
        return proc
    return run


def pytest_report_header(config):
    kind = "ASan/UBSan" if SANITIZED else "plain"
    return f"ckpt-engine build under test: {BUILD_DIR} ({kind} binaries)"
