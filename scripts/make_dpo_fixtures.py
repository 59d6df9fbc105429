#!/usr/bin/env python3
"""Reference values for DPO-family preference losses on the tiny llama fixture model.

Writes dpo_reference.safetensors (default: tests/fixtures/models/llama/) with PyTorch +
transformers + PEFT on the CPU in float32: per-row completion log-probabilities, the loss
of each preference-loss variant and the gradient of that loss, for

  lora.*  policy = the fixture LoRA adapter (models/llama/lora) on the frozen base,
          reference = the same model with the adapter disabled;
  full.*  policy = the base model with every parameter trainable,
          reference = the base with the adapter merged in (a stand-in for "the weights at
          step 0" that differs from the policy, so that the reference terms matter).

The loss formulas are written out here from the papers, following the conventions of TRL's
DPOTrainer / CPOTrainer where the papers leave a choice open (noted at each formula); no
TRL code is used or copied. The file's "fixture" metadata key repeats layout and formulas.

Reads models/llama and models/llama/lora as written by scripts/make_fixtures.py, so run
that first if the model fixtures are regenerated. Byte-for-byte reproducible for the
versions pinned in scripts/requirements-fixtures.txt.

Usage: python scripts/make_dpo_fixtures.py [--out DIR] [--model-dir DIR]
"""
import argparse
import hashlib
import json
import math
import os
import sys

import torch
import torch.nn.functional as F
from safetensors import safe_open

# The pins, versions, determinism set-up and file writer are the supervised fixtures' own.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_fixtures import library_versions, pin_hash_seed, save_reference, setup_determinism  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_MODEL_DIR = os.path.join(REPO_ROOT, "tests", "fixtures", "models", "llama")
FILE_NAME = "dpo_reference.safetensors"

# Distinct from the seeds make_fixtures.py uses (100..406), so the batch is not a copy of
# any other fixture's input_ids.
INPUT_SEED = 600
SEQ_LEN = 16
# Filler after each row's completion. Not the model's pad id 3: transformers builds
# nn.Embedding(padding_idx=3), whose backward silently drops that row's gradient, and the
# full-finetune gradients below would then encode a PyTorch quirk. Id 4 (<|system|> in the
# tokenizer) is an ordinary embedding row to the model; the loss mask excludes it, and as
# padding only follows the completion, causal attention keeps it out of every scored
# position. Prompt/completion ids are drawn from [5, vocab) so that the filler is unambiguous.
FILL_ID = 4
FIRST_DRAWN_ID = 5

# (prompt length, chosen completion length, rejected completion length) for each pair.
# Different lengths per row so that a sum/mean mix-up, or averaging over the wrong count,
# changes the result; chosen and rejected share the prompt as in real preference data.
PAIRS = [(5, 9, 6), (7, 6, 8)]

# beta, label_smoothing (eps), rpo_alpha, simpo gamma. Each variant exercises a different
# part: plain DPO; label smoothing plus the RPO NLL term; per-token averaging with a
# squared loss (IPO); reference-free with a margin (SimPO).
VARIANTS = {
    "sigmoid":        dict(loss_type="sigmoid", beta=0.1, label_smoothing=0.0, rpo_alpha=None, gamma=None),
    "sigmoid_ls_rpo": dict(loss_type="sigmoid", beta=0.1, label_smoothing=0.1, rpo_alpha=0.5, gamma=None),
    "ipo":            dict(loss_type="ipo", beta=0.1, label_smoothing=0.0, rpo_alpha=None, gamma=None),
    "simpo":          dict(loss_type="simpo", beta=2.0, label_smoothing=0.0, rpo_alpha=None, gamma=0.5),
}
FULL_VARIANTS = ["sigmoid"]

FORMULAS = {
    "logps": "logp[r] = sum_j loss_mask[r,j] * log_softmax(logits[r,j-1])[input_ids[r,j]]; "
             "count[r] = sum_j loss_mask[r,j]; avg[r] = logp[r] / count[r]",
    "pairs": "chosen c = rows 0..2, rejected r = rows 2..4 (pair i = rows i and i+2); "
             "loss = mean_i(loss_i) + rpo_alpha * nll (nll term only if rpo_alpha is set)",
    "sigmoid": "x = (logp_c - logp_r) - (ref_c - ref_r); "
               "loss_i = -(1-eps)*logsigmoid(beta*x) - eps*logsigmoid(-beta*x)",
    "ipo": "x as sigmoid but on avg (policy and reference); loss_i = (x - 1/(2*beta))^2",
    "simpo": "z = beta*(avg_c - avg_r) - gamma; loss_i = -(1-eps)*logsigmoid(z) - eps*logsigmoid(-z); "
             "no reference",
    "rpo_nll": "nll = -(logp[0] + logp[1]) / (count[0] + count[1])  (token-mean CE over chosen rows)",
}


# --------------------------------------------------------------------------------------
# Batch
# --------------------------------------------------------------------------------------
def make_batch(vocab_size):
    """input_ids (4, T) in row order [chosen0, chosen1, rejected0, rejected1] and the
    completion mask. All draws come from one generator in a fixed order."""
    gen = torch.Generator().manual_seed(INPUT_SEED)

    def draw(n):
        return torch.randint(FIRST_DRAWN_ID, vocab_size, (n,), generator=gen, dtype=torch.int64)

    prompts = [draw(p) for p, _, _ in PAIRS]
    chosen = [draw(c) for _, c, _ in PAIRS]
    rejected = [draw(r) for _, _, r in PAIRS]
    rows = [(prompts[i], chosen[i]) for i in range(len(PAIRS))] + \
           [(prompts[i], rejected[i]) for i in range(len(PAIRS))]

    input_ids = torch.full((len(rows), SEQ_LEN), FILL_ID, dtype=torch.int64)
    loss_mask = torch.zeros((len(rows), SEQ_LEN), dtype=torch.float32)
    for r, (prompt, completion) in enumerate(rows):
        p, c = len(prompt), len(completion)
        assert p >= 1 and p + c <= SEQ_LEN, "a completion token needs a preceding position"
        input_ids[r, :p] = prompt
        input_ids[r, p:p + c] = completion
        loss_mask[r, p:p + c] = 1.0
    for i, (_, c, r) in enumerate(PAIRS):
        # A pair with identical responses would make every DPO-family term degenerate.
        assert c != r or not torch.equal(chosen[i], rejected[i])
    return input_ids, loss_mask


# --------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------
def load_base(model_dir):
    # Eager attention: the plain softmax(QK^T/sqrt(d) + causal mask) V reference, as in
    # make_fixtures.py. No attention_mask is passed anywhere: rows are right-filled only.
    from transformers import LlamaForCausalLM
    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    return model.eval()


def load_lora(model_dir, lora_dir):
    from peft import PeftModel
    return PeftModel.from_pretrained(load_base(model_dir), lora_dir, is_trainable=True).eval()


def sequence_logps(model, input_ids, loss_mask):
    """Per-row sum of completion-token log-probs: token j is predicted from position j-1."""
    logits = model(input_ids=input_ids).logits
    logprobs = F.log_softmax(logits[:, :-1].float(), dim=-1)
    token_logps = logprobs.gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    # loss_mask[:, 0] is always 0 (make_batch asserts a non-empty prompt), so nothing is lost.
    return (token_logps * loss_mask[:, 1:]).sum(-1)


# --------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------
def preference_loss(variant, logps, ref_logps, counts):
    """Scalar loss of one variant; logps carry the graph, ref_logps are constants."""
    v = VARIANTS[variant]
    beta, eps = v["beta"], v["label_smoothing"]
    n = logps.shape[0] // 2

    if v["loss_type"] == "sigmoid":
        # DPO, Rafailov et al. 2023 ("Direct Preference Optimization", eq. 7), on summed
        # sequence log-probs. Label smoothing is conservative DPO (Mitchell 2023, "A note on
        # DPO with noisy preferences"), TRL DPOTrainer's label_smoothing for loss_type="sigmoid".
        x = (logps[:n] - logps[n:]) - (ref_logps[:n] - ref_logps[n:])
        losses = -(1 - eps) * F.logsigmoid(beta * x) - eps * F.logsigmoid(-beta * x)
    elif v["loss_type"] == "ipo":
        # IPO, Azar et al. 2023 ("A General Theoretical Paradigm to Understand Learning from
        # Human Preferences", eq. 17): (h - 1/(2*tau))^2 with tau = beta. The paper leaves the
        # log-prob normalisation open; TRL DPOTrainer (loss_type="ipo") divides each row's
        # log-prob by its completion length, for policy and reference alike, and so do we.
        avg, ref_avg = logps / counts, ref_logps / counts
        x = (avg[:n] - avg[n:]) - (ref_avg[:n] - ref_avg[n:])
        losses = (x - 1 / (2 * beta)) ** 2
    elif v["loss_type"] == "simpo":
        # SimPO, Meng et al. 2024 ("SimPO: Simple Preference Optimization with a
        # Reference-Free Reward", eq. 6): length-normalised log-probs, target margin gamma,
        # no reference model. Written as in TRL CPOTrainer (loss_type="simpo"), which
        # also applies label smoothing the conservative-DPO way (eps = 0 here).
        avg = logps / counts
        z = beta * (avg[:n] - avg[n:]) - v["gamma"]
        losses = -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)
    else:
        raise ValueError(v["loss_type"])

    loss = losses.mean()
    if v["rpo_alpha"] is not None:
        # RPO, Pang et al. 2024 ("Iterative Reasoning Preference Optimization", eq. 1): an NLL
        # term on the chosen responses. TRL's rpo_alpha adds alpha * (token-mean
        # cross-entropy over all chosen completion tokens of the batch), i.e. normalised by
        # the total token count, not per row.
        nll = -logps[:n].sum() / counts[:n].sum()
        loss = loss + v["rpo_alpha"] * nll
    return loss


def grads_of(model, loss, grad_name):
    """d loss / d every trainable parameter, keyed by grad_name(parameter name)."""
    model.zero_grad(set_to_none=True)
    loss.backward()
    grads = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, f"no gradient for {name}"
            assert p.grad.abs().max().item() > 0, f"all-zero gradient for {name}"
            grads[grad_name(name)] = p.grad.detach().clone()
    model.zero_grad(set_to_none=True)
    return grads


def run_variants(case, model, variants, input_ids, loss_mask, ref_logps, grad_name):
    """One fresh forward + backward per variant, so every stored gradient belongs to exactly
    one loss. Returns the tensors to store and the (shared) policy log-probs."""
    counts = loss_mask.sum(-1)
    out, policy_logps, losses = {}, None, {}
    for variant in variants:
        logps = sequence_logps(model, input_ids, loss_mask)
        if policy_logps is None:
            policy_logps = logps.detach().clone()
        # Same weights, same input: the forward pass must be bit-identical every time.
        assert torch.equal(logps.detach(), policy_logps), "policy forward is not deterministic"
        loss = preference_loss(variant, logps, ref_logps, counts)
        assert torch.isfinite(loss), f"{case}.{variant}: loss {loss.item()}"
        grads = grads_of(model, loss, grad_name)
        out[f"{case}.{variant}.loss"] = loss.detach().clone().reshape(())
        out.update({f"{case}.{variant}.grad.{k}": g for k, g in grads.items()})
        losses[variant] = loss.item()
        print(f"  {case}.{variant}: loss {loss.item():.9f}, {len(grads)} grads, "
              f"max |grad| {max(g.abs().max().item() for g in grads.values()):.3e}")
    vals = list(losses.values())
    assert len(set(vals)) == len(vals), f"{case}: two variants gave the same loss {losses}"
    return out, policy_logps


def check_nll_against_transformers(model, input_ids, loss_mask, policy_logps):
    """The RPO term with transformers' own loss (labels=-100 outside the chosen completions),
    as a cross-check of the mask/shift convention that sequence_logps implements."""
    n = input_ids.shape[0] // 2
    labels = torch.where(loss_mask[:n] > 0, input_ids[:n], torch.full_like(input_ids[:n], -100))
    with torch.no_grad():
        hf_nll = model(input_ids=input_ids[:n], labels=labels).loss.item()
    ours = (-policy_logps[:n].sum() / loss_mask[:n].sum()).item()
    print(f"  chosen-row NLL: ours {ours:.9f}, transformers labels=-100 loss {hf_nll:.9f}")
    assert math.isclose(ours, hf_nll, rel_tol=1e-5), "log-prob convention differs from transformers'"


# --------------------------------------------------------------------------------------
# Cases
# --------------------------------------------------------------------------------------
def lora_case(model_dir, lora_dir, input_ids, loss_mask):
    print("lora (policy = base + adapter, reference = adapter disabled):")
    model = load_lora(model_dir, lora_dir)
    with safe_open(os.path.join(lora_dir, "adapter_model.safetensors"), "pt") as f:
        saved_keys = set(f.keys())

    def grad_name(name):
        # Same key convention as lora_references in make_fixtures.py: the adapter file's
        # tensor names, i.e. PEFT parameter names without the adapter name ".default".
        key = name.replace(".default.", ".")
        assert key in saved_keys, f"{key} not in adapter file"
        return key

    trainable = {grad_name(n) for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == saved_keys, "trainable params != adapter tensors"

    with torch.no_grad(), model.disable_adapter():
        ref_logps = sequence_logps(model, input_ids, loss_mask)
    out, policy_logps = run_variants("lora", model, VARIANTS, input_ids, loss_mask, ref_logps, grad_name)
    check_nll_against_transformers(model, input_ids, loss_mask, policy_logps)
    out["lora.policy_logps"], out["lora.reference_logps"] = policy_logps, ref_logps
    return out


def full_case(model_dir, lora_dir, input_ids, loss_mask):
    print("full (policy = base, all params trainable; reference = base with adapter merged):")
    reference = load_lora(model_dir, lora_dir).merge_and_unload().eval()
    with torch.no_grad():
        ref_logps = sequence_logps(reference, input_ids, loss_mask)
    model = load_base(model_dir)
    for p in model.parameters():
        p.requires_grad_(True)
    # Every row of embed_tokens that occurs in the batch gets a gradient; no occurring id
    # is the padding_idx (see FILL_ID), so nothing is silently dropped.
    assert not (input_ids == model.config.pad_token_id).any()
    out, policy_logps = run_variants("full", model, FULL_VARIANTS, input_ids, loss_mask, ref_logps,
                                     lambda name: name)
    n_params = len(list(model.named_parameters()))
    assert sum(k.startswith("full.sigmoid.grad.") for k in out) == n_params
    out["full.policy_logps"], out["full.reference_logps"] = policy_logps, ref_logps
    return out


# --------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------
def print_logps(ref, loss_mask):
    counts = loss_mask.sum(-1)
    print(f"  completion token counts {[int(c) for c in counts.tolist()]}")
    for case in ("lora", "full"):
        pol, refl = ref[f"{case}.policy_logps"], ref[f"{case}.reference_logps"]
        print(f"  {case}.policy_logps    {[round(v, 6) for v in pol.tolist()]}")
        print(f"  {case}.reference_logps {[round(v, 6) for v in refl.tolist()]}")
        # Otherwise every reference term would cancel and the reference path go untested.
        assert (pol - refl).abs().min().item() > 1e-3, f"{case}: policy and reference logps coincide"
    # The two cases use the same two models in swapped roles (merging is exact up to
    # float32 rounding), which cross-checks disable_adapter and merge_and_unload.
    d1 = (ref["lora.reference_logps"] - ref["full.policy_logps"]).abs().max().item()
    d2 = (ref["lora.policy_logps"] - ref["full.reference_logps"]).abs().max().item()
    print(f"  |lora.reference - full.policy| max {d1:.3e}, |lora.policy - full.reference| max {d2:.3e}")
    assert d1 < 1e-4 and d2 < 1e-4, "adapter disable/merge does not match base/adapter model"




def summarize(path):
    with safe_open(path, "pt") as f:
        keys = list(f.keys())
    counts = {}
    for k in keys:
        parts = k.split(".")
        prefix = ".".join(parts[:3]) if parts[2:3] == ["grad"] else k
        counts[prefix] = counts.get(prefix, 0) + 1
    for prefix, c in sorted(counts.items()):
        print(f"  {prefix}{'.*' if c > 1 or prefix.endswith('.grad') else ''}: {c}")
    h = hashlib.sha256(open(path, "rb").read()).hexdigest()
    size = os.path.getsize(path)
    print(f"{h}  {size} bytes  {len(keys)} tensors  {path}")
    assert size < 1 << 20, "fixture is meant to stay under 1 MB"








def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=DEFAULT_MODEL_DIR,
                    help=f"directory to write {FILE_NAME} into (default: {DEFAULT_MODEL_DIR})")
    ap.add_argument("--model-dir", default=DEFAULT_MODEL_DIR,
                    help="llama fixture model with its lora/ adapter (default: %(default)s)")
    args = ap.parse_args()
    pin_hash_seed()
    setup_determinism()

    model_dir = os.path.abspath(args.model_dir)
    lora_dir = os.path.join(model_dir, "lora")
    with open(os.path.join(model_dir, "config.json")) as f:
        vocab_size = json.load(f)["vocab_size"]
    input_ids, loss_mask = make_batch(vocab_size)
    print(f"input_ids rows (chosen0, chosen1, rejected0, rejected1), filler {FILL_ID}:")
    for row in input_ids.tolist():
        print(f"  {row}")

    ref = {"input_ids": input_ids, "loss_mask": loss_mask}
    ref.update(lora_case(model_dir, lora_dir, input_ids, loss_mask))
    ref.update(full_case(model_dir, lora_dir, input_ids, loss_mask))
    print("logps:")
    print_logps(ref, loss_mask)

    meta = {
        "description": "DPO-family preference-loss references for models/llama; "
                       "see scripts/make_dpo_fixtures.py",
        "versions": library_versions(),
        "input_seed": INPUT_SEED,
        "layout": {
            "rows": ["chosen0", "chosen1", "rejected0", "rejected1"],
            "seq_len": SEQ_LEN,
            "pairs": [{"prompt_len": p, "chosen_len": c, "rejected_len": r} for p, c, r in PAIRS],
            "fill_id": FILL_ID,
            "drawn_ids": f"torch.randint({FIRST_DRAWN_ID}, {vocab_size}) from Generator.manual_seed"
                         f"({INPUT_SEED}): prompt0, prompt1, chosen completions, rejected completions",
            "loss_mask": "1.0 on completion tokens (predicted from the previous position), else 0",
            "forward": "all 4 rows as one batch, causal attention, no attention_mask, positions 0..T-1, eager, float32",
        },
        "cases": {
            "lora": "policy = base + models/llama/lora (only LoRA params trainable); reference = "
                    "adapter disabled; grad keys = adapter_model.safetensors tensor names",
            "full": "policy = base, all params trainable; reference = base with lora merged; "
                    "grad keys = transformers named_parameters() names",
        },
        "variants": {name: VARIANTS[name] for name in VARIANTS},
        "full_variants": FULL_VARIANTS,
        "formulas": FORMULAS,
    }
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(os.path.abspath(args.out), FILE_NAME)
    save_reference(path, ref, meta)
    print("keys:")
    summarize(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
