"""Tiny random checkpoints made at test time with `transformers` (no download): two seeds
of one architecture give two checkpoints whose greedy outputs differ (initializer_range
0.2 makes the logits differ enough that greedy tokens change)."""
import json
import os

ARCHS = ("llama", "qwen2", "qwen2_moe")


def _config(arch, dtype, scale):
    import transformers as tf

    common = dict(vocab_size=2048, hidden_size=256 * scale, intermediate_size=512 * scale,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  initializer_range=0.2, tie_word_embeddings=False, torch_dtype=dtype,
                  max_position_embeddings=512)
    if arch == "llama":
        return tf.LlamaConfig(**common), tf.LlamaForCausalLM
    if arch == "qwen2":
        return tf.Qwen2Config(**common), tf.Qwen2ForCausalLM
    if arch == "qwen2_moe":
        cfg = tf.Qwen2MoeConfig(**common, num_experts=4, num_experts_per_tok=2,
                                moe_intermediate_size=128 * scale,
                                shared_expert_intermediate_size=256 * scale,
                                decoder_sparse_step=1, mlp_only_layers=[])
        return cfg, tf.Qwen2MoeForCausalLM
    raise ValueError("unknown architecture %s (have %s)" % (arch, ", ".join(ARCHS)))


def make_model(path, arch="llama", seed=0, dtype="float32", scale=1, layers=None,
               hidden=None, intermediate=None):
    """Writes a random `arch` model in safetensors to `path`; returns path."""
    import torch

    cfg, cls = _config(arch, dtype, scale)
    if layers:
        cfg.num_hidden_layers = layers
    if hidden:
        cfg.hidden_size = hidden
        cfg.num_attention_heads = max(4, hidden // 128)
        cfg.num_key_value_heads = max(2, cfg.num_attention_heads // 4)
    if intermediate:
        cfg.intermediate_size = intermediate
    torch.manual_seed(seed)
    model = cls(cfg).to(getattr(torch, dtype))
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    with open(os.path.join(path, "ckpt-test-model.json"), "w") as f:
        json.dump({"arch": arch, "seed": seed, "dtype": dtype}, f)
    return path


if __name__ == "__main__":
    import argparse
    ap = argparse.ArgumentParser(description="Writes a tiny random model (safetensors) that "
                                             "vLLM can serve, without a download.")
    ap.add_argument("out")
    ap.add_argument("--arch", default="llama", choices=ARCHS)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", default="float32")
    a = ap.parse_args()
    print(make_model(a.out, a.arch, a.seed, a.dtype))
