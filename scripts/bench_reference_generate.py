"""Reference for `ferrotune bench generate --concurrency N`: transformers (+ PEFT) greedy decoding
of N synthetic prompts as one batch, timed the same way (see src/bench/serve.rs).

    python scripts/bench_reference_generate.py --model DIR [--adapter DIR] --concurrency 8
    python scripts/bench_reference_generate.py --model DIR --make-adapter DIR   # writes a test adapter

Decode throughput = N * (new_tokens - 1) / (T(new_tokens) - T(1)); T(k) is the median wall time
of `generate(max_new_tokens=k, min_new_tokens=k)` for the whole batch (EOS cannot end it early).
`adapter_load_ms` is `PeftModel.from_pretrained` on the loaded base (unmerged), the counterpart
of ferrotune loading an adapter into its serving form. Prompts: token k of request r is
SplitMix64(seed + 1 + r, k) mod vocab, as ferrotune draws them. Prints one JSON line.
"""

import argparse
import json
import resource
import statistics
import time

import torch

MASK = 0xFFFFFFFFFFFFFFFF


def splitmix64(seed: int, k: int) -> int:
    z = (seed + (k + 1) * 0x9E3779B97F4A7C15) & MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
    return z ^ (z >> 31)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--adapter")
    ap.add_argument("--make-adapter", help="write a random (non-zero) LoRA adapter for --model here and exit")
    ap.add_argument("--concurrency", type=int, default=1)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    if args.make_adapter:
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(args.seed)
        config = LoraConfig(r=8, lora_alpha=16, init_lora_weights=False,
                            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
        get_peft_model(model, config).save_pretrained(args.make_adapter)
        return
    adapter_load_ms = None
    if args.adapter:
        from peft import PeftModel

        started = time.perf_counter()
        model = PeftModel.from_pretrained(model, args.adapter).eval()
        adapter_load_ms = (time.perf_counter() - started) * 1e3

    vocab = model.config.vocab_size
    prompts = torch.tensor(
        [[splitmix64(args.seed + 1 + r, k) % vocab for k in range(args.prompt_tokens)] for r in range(args.concurrency)],
        dtype=torch.long,
    )

    def timed(tokens: int) -> float:
        with torch.inference_mode():
            started = time.perf_counter()
            out = model.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=tokens,
                                 min_new_tokens=tokens, do_sample=False, use_cache=True,
                                 pad_token_id=model.config.pad_token_id or 0)
            elapsed = time.perf_counter() - started
        assert out.shape == (args.concurrency, args.prompt_tokens + tokens), out.shape
        return elapsed

    timed(4)  # warm-up
    prefill, full = [], []
    for _ in range(max(args.repeats, 1)):
        prefill.append(timed(1))
        full.append(timed(args.new_tokens))
    prefill_s, full_s = statistics.median(prefill), statistics.median(full)
    print(json.dumps({
        "impl": "transformers", "mode": "generate", "model": args.model.rstrip("/").split("/")[-1],
        "adapter": "lora" if args.adapter else "none", "concurrency": args.concurrency,
        "decode_tokens_per_s": args.concurrency * (args.new_tokens - 1) / max(full_s - prefill_s, 1e-9),
        "prefill_tokens_per_s": args.concurrency * args.prompt_tokens / prefill_s,
        "adapter_load_ms": adapter_load_ms,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "threads": torch.get_num_threads(),
    }))


if __name__ == "__main__":
    main()
