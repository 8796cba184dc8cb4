"""Fixtures of the multi-host tests: `make_hosts(n)` gives n namespace hosts (hosts.py),
torn down after the test whatever happened, every process left in them killed.

Where namespaces cannot be made (not root, no netns support) the tests are skipped with
the reason, except under CI or CTest (hosts.required()): there a missing prerequisite is a
failure, and so is any other skip, never a silent pass."""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import hosts as hostsmod  # noqa: E402
from deploy import ENGINE, WORKER  # noqa: E402


def _fail_skips_when_required(report):
    if hostsmod.required() and report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        lr = report.longrepr
        reason = str(lr[2]) if isinstance(lr, tuple) and len(lr) == 3 else str(lr)
        report.longrepr = ("skipped under CI/CTest, which counts as a failure (multi-host "
                           "tests must run there): " + reason)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    _fail_skips_when_required(outcome.get_result())


@pytest.fixture(scope="session")
def binaries():
    for path in (ENGINE, WORKER):
        if not os.path.isfile(path):
            pytest.fail("%s is not built (CKPT_BUILD_DIR=%s)" % (path, os.environ.get(
                "CKPT_BUILD_DIR", "unset: build/release of this checkout")))


def _prerequisites():
    try:
        hostsmod.clean_stale()
        hostsmod.probe()
    except hostsmod.HostsUnavailable as e:
        if hostsmod.required():
            pytest.fail("multi-host tests must run under CI/CTest, but: %s" % e)
        pytest.skip(str(e))


@pytest.fixture
def netns(binaries):
    """Network namespaces can be made here (else skipped with the reason, or failed under
    CI/CTest)."""
    _prerequisites()


@pytest.fixture
def make_hosts(tmp_path, netns):
    """make_hosts(n) -> hosts.Hosts, up. Everything it made is gone after the test."""
    made = []

    def make(n):
        H = hostsmod.Hosts(n, tmp_path)
        made.append(H)
        return H.up()

    yield make
    for H in made:
        killed = H.down()
        if killed:
            print("harness killed what was left in the namespaces: %s" % killed)
