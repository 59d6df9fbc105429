"""Loads ferrotune's training outputs with Hugging Face transformers / PEFT and compares logits.

    check_with_transformers.py --model DIR --expect FILE                 # a full model directory
    check_with_transformers.py --model BASE --adapter DIR --expect FILE  # a PEFT adapter on BASE

FILE is a safetensors file with `input_ids` (int64 [b, t]) and `logits` (float32 [b, t, vocab])
computed by ferrotune. Prints the max absolute difference; exits 1 above --tolerance.
Needs torch, transformers and peft (scripts/requirements-fixtures.txt).
"""

import argparse
import sys

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--adapter")
    parser.add_argument("--expect", required=True)
    parser.add_argument("--tolerance", type=float, default=1e-4)
    args = parser.parse_args()

    expected = load_file(args.expect)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, attn_implementation="eager")
    if args.adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, args.adapter)
    model.eval()
    with torch.no_grad():
        logits = model(expected["input_ids"]).logits
    diff = (logits - expected["logits"]).abs().max().item()
    print(f"max |transformers - ferrotune| = {diff:.3g}")
    return 0 if diff <= args.tolerance else 1


if __name__ == "__main__":
    sys.exit(main())
