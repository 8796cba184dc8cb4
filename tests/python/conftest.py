"""Shared pytest fixtures: where the build is and how to run its programs.

CTest sets CKPT_BUILD_DIR and CKPT_SOURCE_DIR; run by hand, they default to build/release
of this checkout. CKPT_SANITIZE=ON means the binaries are the ASan/UBSan ones (slower).
"""
import os
import pathlib
import subprocess

import pytest

SOURCE_DIR = pathlib.Path(os.environ.get("CKPT_SOURCE_DIR",
                                         pathlib.Path(__file__).resolve().parents[2]))
BUILD_DIR = pathlib.Path(os.environ.get("CKPT_BUILD_DIR", SOURCE_DIR / "build" / "release"))
SANITIZED = os.environ.get("CKPT_SANITIZE", "").upper() in ("ON", "1", "TRUE", "YES")


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
