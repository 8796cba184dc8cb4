"""Running a real vLLM in this process for the tests and bench/bench_vllm.py."""
import gc

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
