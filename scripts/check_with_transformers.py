"""Loads ferrotune's training outputs with Hugging Face transformers / PEFT and compares logits.

    check_with_transformers.py --model DIR --expect FILE                 # a full model directory
    check_with_transformers.py --model BASE --adapter DIR --expect FILE  # a PEFT adapter on BASE

FILE is a safetensors file with `input_ids` (int64 [b, t]) and `logits` (float32 [b, t, vocab])
computed by ferrotune. Encoders (`--task seq_cls|token_cls|embedding`): FILE also holds
`attention_mask` and `token_type_ids`, and `logits` are the head's logits (`[b, labels]` or
`[b, t, labels]`, compared on real tokens) or the mean-pooled, normalized embeddings `[b, hidden]`;
an adapter's labels come from its `task.json`. Encoder-decoders (`--task seq2seq`, T5): FILE also
holds `attention_mask` and `decoder_input_ids`, and `logits` are `[b, t, vocab]` over the decoder
inputs. Prints the max absolute difference; exits 1 above --tolerance.
An adapter must load without a warning from PEFT (a Python UserWarning, e.g. an unknown key in
adapter_config.json, or a logged warning such as missing or unexpected weights): any is an error,
exit 2. The libraries' deprecation notices about each other's APIs are let through.
Needs torch, transformers and peft (scripts/requirements-fixtures.txt).
"""

import argparse
import logging
import sys
import warnings

import torch
from safetensors.torch import load_file
from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoModelForTokenClassification


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(level=logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(f"{record.name}: {record.getMessage()}")


def load_adapter_strictly(model, adapter_dir):
    from peft import PeftModel

    collected = _Collect()
    loggers = [logging.getLogger("peft"), logging.getLogger("transformers")]
    for logger in loggers:
        logger.addHandler(collected)
    try:
        with warnings.catch_warnings():
            # What PEFT says about the files is a UserWarning; the libraries' deprecation notices
            # about each other's APIs are not about our adapter.
            warnings.simplefilter("error")
            for category in (DeprecationWarning, PendingDeprecationWarning, FutureWarning):
                warnings.simplefilter("default", category)
            # PEFT 0.21.2 says this about the adapters it writes itself for Mixtral and Qwen3-MoE: it
            # checks rank/alpha patterns against module names, and `gate_up_proj` is a parameter.
            # The pattern is applied all the same (the adapter's shapes need it, and the logits
            # compared below would differ without it).
            warnings.filterwarnings(
                "ignore", message=r"The following (rank|alpha)_pattern keys did not match any targeted module "
                r"and were ignored: \['\.\*\\\\\.gate_up_proj'\]"
            )
            model = PeftModel.from_pretrained(model, adapter_dir)
    except Warning as warning:
        print(f"loading the adapter warned: {warning}", file=sys.stderr)
        sys.exit(2)
    finally:
        for logger in loggers:
            logger.removeHandler(collected)
    if collected.messages:
        print("loading the adapter logged warnings:\n  " + "\n  ".join(collected.messages), file=sys.stderr)
        sys.exit(2)
    return model


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--adapter")
    parser.add_argument("--expect", required=True)
    parser.add_argument("--tolerance", type=float, default=1e-4)
    parser.add_argument("--task", default="causal", choices=["causal", "seq_cls", "token_cls", "embedding", "seq2seq"])
    args = parser.parse_args()

    expected = load_file(args.expect)
    if args.task == "seq2seq":
        return check_seq2seq(args, expected)
    if args.task != "causal":
        return check_encoder(args, expected)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, attn_implementation="eager")
    if args.adapter:
        model = load_adapter_strictly(model, args.adapter)
    model.eval()
    with torch.no_grad():
        logits = model(expected["input_ids"]).logits
    diff = (logits - expected["logits"]).abs().max().item()
    print(f"max |transformers - ferrotune| = {diff:.3g}")
    return 0 if diff <= args.tolerance else 1


def check_seq2seq(args, expected):
    from transformers import AutoModelForSeq2SeqLM

    model = AutoModelForSeq2SeqLM.from_pretrained(args.model, dtype=torch.float32)
    if args.adapter:
        model = load_adapter_strictly(model, args.adapter)
    model.eval()
    with torch.no_grad():
        logits = model(
            input_ids=expected["input_ids"],
            attention_mask=expected["attention_mask"],
            decoder_input_ids=expected["decoder_input_ids"],
        ).logits
    diff = (logits - expected["logits"]).abs().max().item()
    print(f"max |transformers - ferrotune| = {diff:.3g}")
    return 0 if diff <= args.tolerance else 1


def check_encoder(args, expected):
    import json
    import os

    classes = {"seq_cls": AutoModelForSequenceClassification, "token_cls": AutoModelForTokenClassification,
               "embedding": AutoModel}
    extra = {}
    if args.adapter and args.task != "embedding":
        with open(os.path.join(args.adapter, "task.json")) as f:
            labels = json.load(f)["labels"]
        # The head comes from the adapter (modules_to_save); the base's may have another size.
        extra = {"num_labels": len(labels), "id2label": dict(enumerate(labels)),
                 "label2id": {l: i for i, l in enumerate(labels)}, "ignore_mismatched_sizes": True}
    model = classes[args.task].from_pretrained(args.model, dtype=torch.float32, attn_implementation="eager", **extra)
    if args.adapter:
        model = load_adapter_strictly(model, args.adapter)
    model.eval()
    mask = expected["attention_mask"]
    with torch.no_grad():
        out = model(input_ids=expected["input_ids"], attention_mask=mask, token_type_ids=expected["token_type_ids"])
    if args.task == "embedding":
        m = mask.unsqueeze(-1).float()
        pooled = (out.last_hidden_state * m).sum(1) / m.sum(1).clamp(min=1e-9)
        ours = torch.nn.functional.normalize(pooled, dim=-1)
        diff = (ours - expected["logits"]).abs().max().item()
    elif args.task == "token_cls":
        diff = ((out.logits - expected["logits"]).abs() * mask.unsqueeze(-1)).max().item()
    else:
        diff = (out.logits - expected["logits"]).abs().max().item()
    print(f"max |transformers - ferrotune| = {diff:.3g}")
    return 0 if diff <= args.tolerance else 1


if __name__ == "__main__":
    sys.exit(main())
