#!/usr/bin/env python3
"""PyTorch + PEFT reference benchmark of DPO training steps on the CPU.

The counterpart of `ferrotune bench train --method dpo` for a speed comparison; it follows
the conventions of shared/perf/bench_torch.py (model loading, thread setup, untimed warm-up
steps, median step time, peak RSS, one JSON line on stdout) so the records line up.

Loss: the sigmoid DPO loss of Rafailov et al. 2023, "Direct Preference Optimization: Your
Language Model is Secretly a Reward Model" (arXiv:2305.18290), Eq. 7, averaged over pairs:

    loss = mean_pairs  -logsigmoid( beta * ((pi_c - pi_r) - (ref_c - ref_r)) )

where pi_* / ref_* are the summed completion log-probabilities of the chosen / rejected row
under the policy / reference model. The reference log-probabilities are computed once, for
all data batches, before timing starts, the way TRL's DPOTrainer does with
`precompute_ref_log_probs=True` (DPOConfig); so no step pays for a reference forward, and
for full fine-tuning no frozen copy of the model is kept. The code is written here from the
paper; nothing is taken from TRL.

  lora: policy = the model with a PEFT LoRA adapter (B = 0 at init), reference = the same
        model under `model.disable_adapter()`, so the reference is the policy at step 0;
  full: every parameter trainable; reference = a no_grad pass of the model before step 0.
Either way the first step's loss is log 2 = 0.693147 (policy == reference).

Synthetic data (reproducible from any language): B pairs per step, each pair two rows of T
tokens; P = T // 2 prompt tokens shared by the pair, then C = T - P completion tokens that
differ between the chosen and the rejected row. Draws come from the SplitMix64 stream of
bench_torch.py seeded with --seed (the k-th draw z_k, k = 0, 1, ...), and
    token id = 4 + z_k mod (vocab_size - 4)      (ids 0..3 are the special tokens).
Batch j (0 <= j < 4) uses draws [j*B*(P+2C), (j+1)*B*(P+2C)); within it pair b takes
B-row-major blocks of P + 2C draws: P prompt ids, C chosen-completion ids, C
rejected-completion ids. Step i (warm-up included, from 0) uses batch i mod 4. One forward
per step over 2B rows: the B chosen rows first, then the B rejected rows. No padding.

Per-row log-prob: sum over the completion positions t in [P, T) of
log_softmax(logits[t-1])[token[t]]. With --logits completion (default) the lm_head is applied
only to the hidden states of the C predicting positions [P-1, T-1) (the decoder is called
for hidden states, then lm_head on that slice); --logits all computes logits at every
position and slices afterwards. The JSON says which ("logits").

Usage:
    ~/.cache/ferrotune-perf/.venv/bin/python scripts/bench_dpo_torch.py \
        --model ~/.cache/ferrotune-perf/models/tiny-llama --method lora --batch 4 --seq 128 --steps 20
"""
import argparse
import json
import math
import os
import resource
import statistics
import sys
import time

sys.dont_write_bytecode = True

DATA_BATCHES = 4
FIRST_ID = 4  # token ids are drawn from [FIRST_ID, vocab)


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True,
                    help="HF Llama model directory, or a name under $PERF_HOME/models (e.g. tiny-llama)")
    ap.add_argument("--method", choices=["lora", "full"], default="lora")
    ap.add_argument("--batch", type=int, default=4, help="preference pairs per step (2x rows)")
    ap.add_argument("--seq", type=int, default=128, help="tokens per row (prompt + completion)")
    ap.add_argument("--steps", type=int, default=20, help="timed steps")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps before the timed ones")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS") or 2))
    ap.add_argument("--r", "--lora-r", dest="r", type=int, default=8)
    ap.add_argument("--alpha", "--lora-alpha", dest="alpha", type=float, default=16)
    ap.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj",
                    help="comma-separated LoRA target module names")
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--attn", default=None, help="attn_implementation (default: transformers' own, SDPA)")
    ap.add_argument("--logits", choices=["completion", "all"], default="completion",
                    help="apply lm_head to the completion-predicting positions only, or to all")
    args = ap.parse_args()
    if args.seq < 2 or args.batch < 1 or args.steps < 1 or args.warmup < 0:
        ap.error("need --seq >= 2, --batch >= 1, --steps >= 1, --warmup >= 0")
    return args


ARGS = parse_args()
# Thread counts must be fixed before torch (OpenMP / MKL) initialises.
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[_var] = str(ARGS.threads)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import warnings  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

warnings.filterwarnings("ignore", category=FutureWarning)
hf_logging.disable_progress_bar()
torch.set_num_threads(ARGS.threads)


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


def resolve_model(arg):
    """ARG if it is a directory, else $PERF_HOME/models/<last part of ARG> (as perfenv.py)."""
    path = os.path.expanduser(arg)
    if os.path.isdir(path):
        return os.path.abspath(path)
    home = os.path.expanduser(os.environ.get("PERF_HOME") or "~/.cache/ferrotune-perf")
    return os.path.join(home, "models", os.path.basename(os.path.normpath(arg)))


def splitmix64(seed, start, n):
    """Draws [start, start+n) of the SplitMix64 stream seeded with `seed` (uint64 array)."""
    with np.errstate(over="ignore"):
        k = np.arange(start + 1, start + n + 1, dtype=np.uint64)
        z = np.uint64(seed & 0xFFFFFFFFFFFFFFFF) + k * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def pair_batch(seed, j, pairs, prompt_len, comp_len, vocab):
    """Batch j as a (2*pairs, prompt_len+comp_len) int64 tensor: chosen rows, then rejected."""
    per_pair = prompt_len + 2 * comp_len
    z = splitmix64(seed, j * pairs * per_pair, pairs * per_pair)
    ids = (np.uint64(FIRST_ID) + z % np.uint64(vocab - FIRST_ID)).astype(np.int64).reshape(pairs, per_pair)
    prompt = ids[:, :prompt_len]
    chosen = np.concatenate([prompt, ids[:, prompt_len:prompt_len + comp_len]], axis=1)
    rejected = np.concatenate([prompt, ids[:, prompt_len + comp_len:]], axis=1)
    return torch.from_numpy(np.concatenate([chosen, rejected], axis=0))


def completion_logps(causal_lm, ids, prompt_len, all_logits):
    """Summed log-prob of tokens [prompt_len, T) of each row, each predicted from the position before.

    causal_lm is the (possibly LoRA-injected) LlamaForCausalLM itself, not the PEFT wrapper.
    """
    targets = ids[:, prompt_len:]                                   # (R, C)
    if all_logits:
        logits = causal_lm(input_ids=ids, use_cache=False).logits   # (R, T, V)
        logits = logits[:, prompt_len - 1:-1, :]
    else:
        hidden = causal_lm.model(input_ids=ids, use_cache=False).last_hidden_state   # (R, T, H)
        logits = causal_lm.lm_head(hidden[:, prompt_len - 1:-1, :])                 # (R, C, V)
    logp = torch.log_softmax(logits.float(), dim=-1)
    return logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1).sum(dim=-1)          # (R,)


def dpo_loss(policy, ref, pairs, beta):
    """Sigmoid DPO loss (Rafailov et al. 2023, Eq. 7), mean over pairs; rows are [chosen; rejected]."""
    pi_logratio = policy[:pairs] - policy[pairs:]
    ref_logratio = ref[:pairs] - ref[pairs:]
    return -F.logsigmoid(beta * (pi_logratio - ref_logratio)).mean()


def main():
    args = ARGS
    from transformers import AutoModelForCausalLM

    model_dir = resolve_model(args.model)
    with open(os.path.join(model_dir, "config.json")) as f:
        cfg = json.load(f)
    if cfg.get("model_type") != "llama":
        raise SystemExit(f"{model_dir}: needs a llama causal LM, got {cfg.get('model_type')}")
    vocab = cfg["vocab_size"]
    pairs, seq = args.batch, args.seq
    prompt_len = seq // 2
    comp_len = seq - prompt_len
    targets = [t for t in args.targets.split(",") if t]
    all_logits = args.logits == "all"

    rss_base = peak_rss_mb()
    # transformers' default attention (SDPA), as shared/perf/bench_torch.py loads it: the faster path.
    extra = {"attn_implementation": args.attn} if args.attn else {}
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, **extra)
    if args.method == "lora":
        from peft import LoraConfig, TaskType, get_peft_model

        torch.manual_seed(args.seed)  # LoRA A init (B starts at zero)
        lcfg = LoraConfig(r=args.r, lora_alpha=args.alpha, lora_dropout=0.0, bias="none",
                          target_modules=targets, task_type=TaskType.CAUSAL_LM)
        model = get_peft_model(model, lcfg)
        causal_lm = model.get_base_model()  # LlamaForCausalLM with the LoRA layers injected
    else:
        causal_lm = model
        for p in model.parameters():
            p.requires_grad_(True)
    model.train()

    params = [p for p in model.parameters() if p.requires_grad]
    params_total = sum(p.numel() for p in model.parameters())
    params_trainable = sum(p.numel() for p in params)
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)

    batches = [pair_batch(args.seed, j, pairs, prompt_len, comp_len, vocab) for j in range(DATA_BATCHES)]

    # Reference log-probs for every batch, before any step (cf. TRL precompute_ref_log_probs).
    t_ref = time.perf_counter()
    with torch.no_grad():
        if args.method == "lora":
            with model.disable_adapter():
                refs = [completion_logps(causal_lm, x, prompt_len, all_logits) for x in batches]
        else:
            refs = [completion_logps(causal_lm, x, prompt_len, all_logits) for x in batches]
    ref_precompute_s = time.perf_counter() - t_ref

    losses, times = [], []
    for i in range(args.warmup + args.steps):
        j = i % DATA_BATCHES
        t0 = time.perf_counter()
        policy = completion_logps(causal_lm, batches[j], prompt_len, all_logits)
        loss = dpo_loss(policy, refs[j], pairs, args.beta)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss_v = loss.item()
        t1 = time.perf_counter()
        losses.append(loss_v)
        if i >= args.warmup:
            times.append(t1 - t0)

    rec = {
        "impl": "torch+peft",  # as shared/perf/bench_torch.py names it
        "mode": "train",
        "method": f"dpo-{args.method}",
        "model": os.path.basename(os.path.normpath(model_dir)),
        "model_type": cfg["model_type"],
        "torch": torch.__version__.split("+")[0],
        "threads": args.threads,
        "params_total": params_total,
        "params_trainable": params_trainable,
        "steps": args.steps,
        "warmup": args.warmup,
        "batch": pairs,
        "rows": 2 * pairs,
        "seq": seq,
        "prompt_len": prompt_len,
        "completion_len": comp_len,
        "tokens_per_s": round(2 * pairs * seq * len(times) / sum(times), 2),
        "step_ms_median": round(1000 * statistics.median(times), 2),
        "step_ms_min": round(1000 * min(times), 2),
        "step_ms_mean": round(1000 * statistics.mean(times), 2),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "rss_before_load_mb": round(rss_base, 1),
        "loss_first": round(losses[0], 6),
        "loss_last": round(losses[-1], 6),
        "loss_log2_diff": round(losses[0] - math.log(2.0), 9),
        "logits": "all_positions" if all_logits else "completion_positions",
        "ref_logps": "precomputed",
        "ref_precompute_ms": round(1000 * ref_precompute_s, 2),
        "beta": args.beta,
        "lr": args.lr,
        "weight_decay": 0.0,
        "seed": args.seed,
        "data_batches": DATA_BATCHES,
    }
    if args.method == "lora":
        rec.update({"lora_r": args.r, "lora_alpha": args.alpha, "targets": ",".join(targets)})
    rec["step_ms"] = [round(1000 * t, 1) for t in times]
    print(json.dumps(rec), flush=True)


if __name__ == "__main__":
    main()
