#!/usr/bin/env python3
"""PyTorch + PEFT training-step speed on a mixture-of-experts model (the reference side of
scripts/bench-moe.sh), measured as ../shared/perf/bench_torch.py measures the dense models: the
same SplitMix64 token batches, AdamW lr 1e-4, LoRA r 8 / alpha 16 on q,k,v,o, timed steps after
warm-up steps. The shared harness loads only Llama as a causal LM, hence this script.

The model computes transformers' loss with `output_router_logits=True`: mean next-token
cross-entropy plus `router_aux_loss_coef` times the load-balancing loss, as ferrotune trains.

  python scripts/bench_moe_torch.py --model DIR [--method lora|full] [--batch 8] [--seq 128]
      [--steps 10] [--target-parameters gate_up_proj,down_proj] [--profile]

--profile adds the share of the step spent in the MoE blocks' router (`mlp.gate`) and in the
experts (`mlp.experts`), forward only, from forward hooks. Prints one JSON line.
"""
import argparse
import json
import os
import resource
import statistics
import time


def parse_args():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--method", choices=["lora", "full"], default="lora")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lora-r", type=int, default=8)
    ap.add_argument("--lora-alpha", type=float, default=16)
    ap.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj")
    ap.add_argument("--target-parameters", default="")
    ap.add_argument("--profile", action="store_true")
    return ap.parse_args()


ARGS = parse_args()
for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[var] = str(ARGS.threads)
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(ARGS.threads)

MASK64 = (1 << 64) - 1


def splitmix64(seed, start, n):
    """Values start+1 .. start+n of the SplitMix64 sequence seeded with `seed` (as
    ferrotune's `rng::splitmix64`)."""
    with np.errstate(over="ignore"):
        z = np.uint64(seed & MASK64) + np.arange(start + 1, start + n + 1, dtype=np.uint64) * np.uint64(
            0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def batch(seed, j, b, t, vocab):
    z = splitmix64(seed, j * b * t, b * t)
    return torch.from_numpy((z % np.uint64(vocab)).astype(np.int64).reshape(b, t))


def main():
    from transformers import AutoModelForCausalLM

    args = ARGS
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    model.config.output_router_logits = True
    if args.method == "lora":
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(args.seed)
        params = [p for p in args.target_parameters.split(",") if p]
        config = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=0.0, bias="none",
                            target_modules=args.targets.split(","), target_parameters=params or None,
                            task_type="CAUSAL_LM")
        model = get_peft_model(model, config)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    vocab = model.config.vocab_size
    batches = [batch(args.seed, j, args.batch, args.seq, vocab) for j in range(4)]

    spent = {"router": 0.0, "experts": 0.0}
    if args.profile:
        def timed(kind):
            def pre(module, inputs):
                module._started = time.perf_counter()

            def post(module, inputs, output):
                spent[kind] += time.perf_counter() - module._started
            return pre, post

        for name, module in model.named_modules():
            kind = "router" if name.endswith("mlp.gate") else "experts" if name.endswith("mlp.experts") else None
            if kind:
                pre, post = timed(kind)
                module.register_forward_pre_hook(pre)
                module.register_forward_hook(post)

    losses, times = [], []
    timed_spent = {"router": 0.0, "experts": 0.0}
    for i in range(args.warmup + args.steps):
        x = batches[i % 4]
        for k in spent:
            spent[k] = 0.0
        t0 = time.perf_counter()
        out = model(input_ids=x, labels=x, use_cache=False)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(out.loss.item())
        elapsed = time.perf_counter() - t0
        if i >= args.warmup:
            times.append(elapsed)
            for k in spent:
                timed_spent[k] += spent[k]
    total = sum(times)
    rec = {
        "impl": "torch+peft", "mode": "train", "method": args.method,
        "model": os.path.basename(os.path.normpath(args.model)), "torch": torch.__version__.split("+")[0],
        "threads": args.threads, "batch": args.batch, "seq": args.seq, "steps": args.steps,
        "params_trainable": sum(p.numel() for p in trainable),
        "tokens_per_s": round(args.batch * args.seq * args.steps / total, 2),
        "step_ms_median": round(1000 * statistics.median(times), 2),
        "loss_first": round(losses[0], 6), "loss_last": round(losses[-1], 6),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1),
    }
    if args.profile:
        rec["router_forward_share_of_step"] = round(timed_spent["router"] / total, 4)
        rec["experts_forward_share_of_step"] = round(timed_spent["experts"] / total, 4)
    print(json.dumps(rec))


if __name__ == "__main__":
    main()
