#!/usr/bin/env python3
"""The PyTorch + transformers + PEFT side of `ferrotune bench train` on a T5 model.

Runs the same teacher-forced training steps as `src/bench/seq2seq.rs` on the same model directory
and prints one JSON line in the perf harness's train format (`impl: "torch"`), so the two can be
compared in one run:

    python scripts/bench_reference_t5.py --make-model /tmp/small-t5
    python scripts/bench_reference_t5.py --model /tmp/small-t5 --method lora --threads 2
    RAYON_NUM_THREADS=2 ferrotune bench train --model /tmp/small-t5 --method lora

Data (both sides): batch j's encoder ids are draws [2·j·B·T, 2·j·B·T + B·T) of the SplitMix64
stream seeded with --seed, modulo the vocabulary; its labels the next B·T draws; the decoder input
is the labels shifted right after the decoder start token. Four batches are cycled. Mean
cross-entropy over every label, AdamW (lr 1e-4, no weight decay), LoRA r/alpha on q,k,v,o.
"""

import argparse
import json
import resource
import time

import numpy as np
import torch

MASK64 = (1 << 64) - 1


def splitmix(seed, start, count):
    """Values start..start+count of the SplitMix64 stream (as `ferrotune::rng::splitmix64`)."""
    with np.errstate(over="ignore"):
        k = np.arange(start + 1, start + count + 1, dtype=np.uint64)
        z = np.uint64(seed & MASK64) + k * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def batches(seed, batch, seq, vocab, start_token, count=4):
    n = batch * seq
    out = []
    for j in range(count):
        ids = (splitmix(seed, 2 * j * n, n) % np.uint64(vocab)).astype(np.int64).reshape(batch, seq)
        labels = (splitmix(seed, 2 * j * n + n, n) % np.uint64(vocab)).astype(np.int64).reshape(batch, seq)
        decoder = np.concatenate([np.full((batch, 1), start_token, dtype=np.int64), labels[:, :-1]], axis=1)
        out.append(tuple(torch.from_numpy(x) for x in (ids, decoder, labels)))
    return out


def make_model(path):
    """A random Flan-T5-shaped model (gated-GELU, 4 + 4 layers, d_model 256) with no dropout."""
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(1234)
    config = T5Config(
        vocab_size=4096, d_model=256, d_kv=64, d_ff=1024, num_layers=4, num_decoder_layers=4,
        num_heads=4, feed_forward_proj="gated-gelu", dropout_rate=0.0, pad_token_id=0,
        eos_token_id=1, decoder_start_token_id=0,
    )
    T5ForConditionalGeneration(config).save_pretrained(path)
    print(f"wrote {path}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--make-model", metavar="DIR")
    parser.add_argument("--model")
    parser.add_argument("--method", default="lora", choices=["lora", "full"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lora-r", type=int, default=8)
    parser.add_argument("--lora-alpha", type=float, default=16.0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if args.make_model:
        make_model(args.make_model)
        return
    torch.set_num_threads(args.threads)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    from transformers import T5ForConditionalGeneration

    model = T5ForConditionalGeneration.from_pretrained(args.model, torch_dtype=torch.float32)
    params_total = sum(p.numel() for p in model.parameters())
    if args.method == "lora":
        from peft import LoraConfig, TaskType, get_peft_model

        lora = LoraConfig(task_type=TaskType.SEQ_2_SEQ_LM, r=args.lora_r, lora_alpha=args.lora_alpha,
                          lora_dropout=0.0, target_modules=["q", "k", "v", "o"])
        model = get_peft_model(model, lora)
        params_total = sum(p.numel() for p in model.parameters())
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4, weight_decay=0.0)
    config = model.config
    data = batches(args.seed, args.batch, args.seq, config.vocab_size, config.decoder_start_token_id)
    mask = torch.ones(args.batch, args.seq, dtype=torch.int64)
    times, first, last = [], None, None
    for step in range(args.warmup + args.steps):
        ids, decoder, labels = data[step % len(data)]
        started = time.perf_counter()
        out = model(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder, labels=labels)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        value = out.loss.item()
        if step >= args.warmup:
            times.append(time.perf_counter() - started)
        first = value if first is None else first
        last = value
    name = args.model.rstrip("/").split("/")[-1]
    tokens = 2 * args.batch * args.seq * args.steps
    print(json.dumps({
        "impl": "torch", "mode": "train", "method": args.method, "model": name,
        "params_total": params_total, "params_trainable": sum(p.numel() for p in trainable),
        "batch": args.batch, "seq": args.seq, "steps": args.steps, "device": "cpu",
        "tokens_per_s": tokens / sum(times), "step_ms_median": sorted(times)[len(times) // 2] * 1e3,
        "loss_first": first, "loss_last": last,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
        "rss_before_load_mb": rss_before, "threads": args.threads,
    }))


if __name__ == "__main__":
    main()
