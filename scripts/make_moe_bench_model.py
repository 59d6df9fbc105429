#!/usr/bin/env python3
"""Writes `tiny-mixtral` for scripts/bench-moe.sh: a Mixtral-shaped model with the dimensions of
the perf harness's tiny-llama (d 256, 4 layers, 8 heads / 4 kv heads, vocab 4096) and 8 experts of
tiny-llama's MLP width (688), 2 per token. Random weights (seed 0), transformers' own init; no
tokenizer (the benchmarks draw token ids).

  python scripts/make_moe_bench_model.py OUT_DIR
"""
import sys

import torch
import transformers


def main():
    out = sys.argv[1]
    config = transformers.MixtralConfig(
        vocab_size=4096, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=4, head_dim=32, max_position_embeddings=512,
        num_local_experts=8, num_experts_per_tok=2, rms_norm_eps=1e-5, tie_word_embeddings=False,
        router_aux_loss_coef=0.02, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )
    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM(config).to(torch.float32)
    model.save_pretrained(out)
    print(f"{out}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters")


if __name__ == "__main__":
    main()
