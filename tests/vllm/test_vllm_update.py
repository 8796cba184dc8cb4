"""A real vLLM updated in place by ckpt-engine: greedy tokens after the update equal those
of a fresh vLLM started on the new checkpoint, and differ from the old ones."""
import os
import tempfile

import pytest

import ext_hooks
import mpijob
from vllm_helpers import close_llm, greedy, make_llm

from ckpt_engine import vllm as ckv


class Engine:
    """One `ckpt-engine serve` job (1 rank by default) driven through a FIFO."""

    def __init__(self, nranks=1, sock=None):
        self.dep = mpijob.Deployment(tempfile.mkdtemp(prefix="ckpt-vllm-"), nranks)
        if sock:
            self.dep.sock = sock
        self.srv = mpijob.InteractiveServe(self.dep, nranks=nranks)

    @property
    def sock(self):
        return self.dep.sock

    def command(self, line, timeout=120):
        return self.srv.command(line, timeout)

    def close(self):
        self.srv.close()


def update_via_engine(llm, eng, name, extra=""):
    """Starts `update NAME` on the engine and runs the extension in every vLLM worker."""
    eng.srv.send("update %s verify=1 %s" % (name, extra))
    results = ckv.update(llm, socket_dir=eng.sock, timeout_s=60)
    res = eng.srv.result(120)
    return results, res


def register_and_update(llm, eng, name, path):
    """Registers `path` as `name` and updates vLLM from it; both must succeed."""
    assert eng.command("register %s %s" % (name, path))["ok"]
    results, res = update_via_engine(llm, eng, name)
    assert res["ok"] and results[0]["completed"], (res, results)
    return results, res


@pytest.mark.parametrize("arch,dtype", [("llama", "float32"), ("qwen2", "bfloat16")])
def test_update_from_files_matches_fresh_load(ckpts, arch, dtype):
    a, b = ckpts.path(arch, dtype, "A"), ckpts.path(arch, dtype, "B")
    # Fresh loads first: in one process, vLLM's parallel state is global and closing one
    # LLM tears it down under another.
    want_b = ckpts.fresh_tokens(arch, dtype, "B")
    want_a = ckpts.fresh_tokens(arch, dtype, "A")
    eng = Engine()
    llm = make_llm(a, dtype)
    try:
        before = greedy(llm)
        assert before == want_a
        assert before != want_b, "A and B must answer differently for the test to mean much"
        assert eng.command("register b %s" % b)["ok"]
        results, res = update_via_engine(llm, eng, "b")
        assert res["ok"], res
        assert len(results) == 1 and results[0]["completed"], results
        assert results[0]["version"] == res["version"]
        assert results[0]["tensors"] == res["tensors"] and results[0]["bytes"] == res["bytes"]
        assert greedy(llm) == want_b
        st = llm.collective_rpc("ckpt_engine_status")[0]
        assert st["state"] == "consistent" and st["version"] == res["version"], st
    finally:
        close_llm(llm)
        eng.close()


def test_dummy_start_first_update_brings_the_weights(ckpts):
    """load_format="dummy": vLLM starts with random weights (the fast start); the first
    update brings the real ones."""
    a, b = ckpts.path("llama", "float32", "A"), ckpts.path("llama", "float32", "B")
    want_b = ckpts.fresh_tokens("llama", "float32", "B")
    eng = Engine()
    llm = make_llm(a, "float32", load_format="dummy")
    try:
        assert greedy(llm) != want_b
        register_and_update(llm, eng, "b", b)
        assert greedy(llm) == want_b
    finally:
        close_llm(llm)
        eng.close()


def test_engine_killed_mid_update_is_reported_then_a_new_engine_completes(ckpts):
    """The whole engine job is SIGKILLed after the first bucket reached vLLM: the update is
    reported incomplete (never complete), the status says so, vLLM stays up; a new engine
    on the same socket directory then updates the same vLLM, which answers as a fresh
    load of B."""
    a, b = ckpts.path("llama", "float32", "A"), ckpts.path("llama", "float32", "B")
    want_b = ckpts.fresh_tokens("llama", "float32", "B")
    eng = Engine()
    llm = make_llm(a, "float32")
    eng2 = None
    try:
        assert eng.command("register b %s" % b)["ok"]
        ext_hooks.KILL_PIDS[:] = eng.srv.rank_pids() + [eng.srv.proc.pid]
        assert ext_hooks.KILL_PIDS
        # Small buckets: the update has several, and the engine dies after the first.
        eng.srv.send("update b bucket=2MiB timeout=20000")
        with pytest.raises(Exception) as err:
            ckv.update(llm, socket_dir=eng.sock, timeout_s=20)
        assert ext_hooks.KILLED, "the hook never ran: the update had no second bucket"
        assert "incomplete" in str(err.value), err.value
        st = llm.collective_rpc("ckpt_engine_status")[0]
        assert st["state"] == "incomplete" and st["reason"], st
        eng.srv.proc.wait(timeout=60)

        eng2 = Engine(sock=eng.sock)
        results, _ = register_and_update(llm, eng2, "b", b)
        assert results[0]["buckets"] >= 1
        assert llm.collective_rpc("ckpt_engine_status")[0]["state"] == "consistent"
        assert greedy(llm) == want_b
    finally:
        close_llm(llm)
        if eng2:
            eng2.close()
        try:
            eng.close()
        except Exception:
            pass


def test_moe_update_equals_vllms_own_reload(ckpts):
    """A small MoE (Qwen2-MoE): vLLM 0.32's CPU build does not reproduce a fresh load after
    any in-place reload of an MoE (its own reload_weights from disk answers the same as our
    update, and differently from a fresh start on B). So this checks what ckpt-engine owns:
    the update answers exactly like vLLM's own in-place reload of B's files."""
    a, b = ckpts.path("qwen2_moe", "float32", "A"), ckpts.path("qwen2_moe", "float32", "B")
    ref = make_llm(a, "float32", extension=None)
    try:
        ref.collective_rpc("reload_weights", kwargs={"weights_path": str(b),
                                                     "is_checkpoint_format": True})
        ref.reset_prefix_cache()
        want = greedy(ref)
    finally:
        close_llm(ref)
    eng = Engine()
    llm = make_llm(a, "float32")
    try:
        before = greedy(llm)
        assert before != want
        register_and_update(llm, eng, "b", b)
        assert greedy(llm) == want
    finally:
        close_llm(llm)
        eng.close()


def test_trainer_publishes_torch_tensors_then_vllm_updates(ckpts):
    """The RL loop without files: a trainer holds torch tensors (here: B's, then A's),
    publishes them to the engine rank (one copy into a sealed memfd the rank adopts), and
    vLLM takes each step in place; step 2 under the same name replaces step 1."""
    from safetensors.torch import load_file
    from ckpt_engine import publish
    a, b = ckpts.path("llama", "bfloat16", "A"), ckpts.path("llama", "bfloat16", "B")
    want_a = ckpts.fresh_tokens("llama", "bfloat16", "A")
    want_b = ckpts.fresh_tokens("llama", "bfloat16", "B")
    eng = Engine()
    llm = make_llm(a, "bfloat16")
    try:
        assert greedy(llm) == want_a
        for step, (path, want) in enumerate([(b, want_b), (a, want_a)], start=1):
            tensors = load_file(str(path / "model.safetensors"))  # the trainer's memory
            assert any(t.dtype.is_floating_point and t.element_size() == 2
                       for t in tensors.values())
            eng.srv.send("await-published policy timeout=60000")
            r = publish("policy", tensors, socket_dir=eng.sock, step=step, timeout_s=60)
            assert r.registered and r.version, r
            res = eng.srv.result(120)
            assert res["ok"], res
            results, upd = update_via_engine(llm, eng, "policy")
            assert upd["ok"] and results[0]["completed"], (upd, results)
            assert results[0]["version"] == r.version
            assert greedy(llm) == want, "step %d" % step
    finally:
        close_llm(llm)
        eng.close()


def test_verify_refuses_a_corrupt_bucket_before_vllm_sees_it(ckpts):
    """`update NAME verify=1`: the extension checks every tensor's XXH3-64 in the shared
    buffer before handing it to vLLM. One byte flipped in the engine's pool after
    registration (a stray write, from outside the engine) fails the update naming the
    tensor, and vLLM still answers as before: nothing landed."""
    a, b = ckpts.path("llama", "float32", "A"), ckpts.path("llama", "float32", "B")
    want_a = ckpts.fresh_tokens("llama", "float32", "A")
    eng = Engine()
    llm = make_llm(a, "float32")
    try:
        assert eng.command("register b %s" % b)["ok"]
        name, needle = mpijob.largest_tensor_needle(b)
        mpijob.corrupt_pool_byte(eng.srv.rank_pids(), needle)
        eng.srv.send("update b verify=1 bucket=4MiB")
        with pytest.raises(Exception) as err:
            ckv.update(llm, socket_dir=eng.sock, timeout_s=30)
        res = eng.srv.result(120)
        assert not res["ok"] and "checksum" in res["reason"].lower(), res
        assert name in res["reason"], (name, res)
        assert "incomplete" in str(err.value) and "checksum" in str(err.value).lower(), err.value
        assert llm.collective_rpc("ckpt_engine_status")[0]["state"] == "incomplete"
        assert greedy(llm) == want_a
    finally:
        close_llm(llm)
        eng.close()


def test_update_missing_tensors_is_refused_and_vllm_keeps_serving(ckpts, tmp_path):
    """After a complete update the extension knows the checkpoint's tensors (set_model): a
    later checkpoint that lacks one of them (not marked partial) is refused before a byte
    lands, naming it; vLLM answers exactly as before and stays `consistent`."""
    from safetensors.torch import load_file, save_file
    a, b = ckpts.path("llama", "float32", "A"), ckpts.path("llama", "float32", "B")
    want_b = ckpts.fresh_tokens("llama", "float32", "B")
    part = tmp_path / "part"
    part.mkdir()
    tensors = {}
    for f in sorted(os.listdir(a)):
        if f.endswith(".safetensors"):
            tensors.update(load_file(os.path.join(a, f)))
    dropped = "model.norm.weight"
    assert dropped in tensors
    del tensors[dropped]
    save_file(tensors, str(part / "model.safetensors"))
    eng = Engine()
    llm = make_llm(a, "float32")
    try:
        _, good = register_and_update(llm, eng, "b", b)
        assert greedy(llm) == want_b
        assert eng.command("register part %s" % part)["ok"]
        eng.srv.send("update part")
        with pytest.raises(Exception) as err:
            ckv.update(llm, socket_dir=eng.sock, timeout_s=30)
        res = eng.srv.result(120)
        assert not res["ok"] and dropped in res["reason"], res
        assert "missing from the update" in res["reason"], res
        assert "refused" in str(err.value) and "before any byte landed" in str(err.value), err.value
        st = llm.collective_rpc("ckpt_engine_status")[0]
        assert st["state"] == "consistent" and st["version"] == good["version"], st
        assert greedy(llm) == want_b
    finally:
        close_llm(llm)
        eng.close()
