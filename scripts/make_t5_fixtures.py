#!/usr/bin/env python3
"""Tiny random T5 fixtures with reference outputs from transformers + PEFT.

Usage:
  python scripts/make_t5_fixtures.py [--out tests/fixtures/t5]

Two variants, both 2 encoder + 2 decoder layers, d_model 32, 4 heads of 8, d_ff 48, 8 relative
position buckets over a distance of 16:
  t5-tied    original T5: ReLU feed-forward, output head tied to the shared embedding (and the
             decoder output scaled by d_model^-0.5 before it)
  t5-gated   T5 v1.1 / Flan-T5: gated-gelu feed-forward (wi_0, wi_1) and a separate
             lm_head.weight, written as the Hub's v1.1 checkpoints are (`tie_word_embeddings:
             false`, no `scale_decoder_outputs`); transformers 5 loads such a head untied
Each directory holds config.json, generation_config.json, model.safetensors, tokenizer.json
(a Unigram vocabulary written out, not trained, so it is the same on every run),
tokenizer_config.json, a PEFT LoRA adapter in lora/ and reference.safetensors:
  input_ids, attention_mask            the encoder batch (two rows, the second padded)
  labels, decoder_input_ids            targets (-100 where padded) and their right shift
  encoder_hidden, logits, loss         eval-mode encoder output, logits and transformers' loss
  grad.<name>                          one-step gradients of that loss (named_parameters names)
  lora.logits, lora.loss               the same through the adapter in lora/
  lora.grad.<name>                     gradients of the LoRA factors (PEFT names)
  greedy.input_ids                     one prompt
  greedy.output, lora.greedy.output    model.generate(greedy, max_new_tokens=10) of that prompt
Needs the packages of scripts/requirements-fixtures.txt.
"""

import argparse
import json
import os
import shutil
import sys

import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import T5Config, T5ForConditionalGeneration

PROMPTS = ["translate: the cat", "translate: the dog", "translate: the house", "translate: my invoice",
           "translate: a refund", "translate: the password"]
TARGETS = ["die katze", "der hund", "das haus", "meine rechnung", "eine erstattung", "das passwort"]
OTHER = ["summarize: please refund my last order", "how do i reset my password",
         "the invoice was charged twice", "my parcel arrived broken"]
SPECIALS = ["<pad>", "</s>", "<unk>"]
VOCAB_SIZE = 128


def unigram_tokenizer():
    """Whole `▁word` pieces for every word seen (preferred), then single characters with and
    without `▁` so that any lowercase text still tokenizes; `</s>` appended as T5 does."""
    words = sorted({w for line in PROMPTS + TARGETS + OTHER for w in line.split()})
    chars = sorted(set("abcdefghijklmnopqrstuvwxyz0123456789:.,?!'-"))
    pieces = [(s, 0.0) for s in SPECIALS]
    pieces += [("▁" + w, -2.0) for w in words]
    pieces += [("▁", -4.0)]
    pieces += [("▁" + c, -5.0) for c in chars]
    pieces += [(c, -6.0) for c in chars]
    assert len(pieces) <= VOCAB_SIZE, len(pieces)
    tok = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    tok.add_special_tokens(SPECIALS)
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)])
    return tok


def tokenizer_config():
    return {
        "tokenizer_class": "T5Tokenizer",
        "pad_token": "<pad>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "model_max_length": 512,
        "extra_ids": 0,
        "additional_special_tokens": [],
    }


def untie(out_dir, config):
    """transformers 5 always writes T5 tied; a v1.1 checkpoint has its own head."""
    path = os.path.join(out_dir, "model.safetensors")
    weights = load_file(path)
    weights["lm_head.weight"] = torch.randn(config.vocab_size, config.d_model) * config.d_model ** -0.5
    save_file(weights, path, metadata={"format": "pt"})
    with open(os.path.join(out_dir, "config.json")) as f:
        raw = json.load(f)
    raw["tie_word_embeddings"] = False
    raw.pop("scale_decoder_outputs", None)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(raw, f, indent=2, sort_keys=True)
        f.write("\n")


def padded(rows, pad):
    width = max(len(r) for r in rows)
    return torch.tensor([r + [pad] * (width - len(r)) for r in rows])


def batch(tok):
    enc = [tok.encode(p).ids for p in ["translate: my invoice", "a refund"]]
    dec = [tok.encode(t).ids for t in ["meine rechnung", "eine"]]
    ids = padded(enc, 0)
    mask = padded([[1] * len(r) for r in enc], 0)
    labels = padded(dec, -100)
    return ids, mask, labels


def make(name, out_root, tok):
    torch.manual_seed({"t5-tied": 11, "t5-gated": 12}[name])
    tied = name == "t5-tied"
    config = T5Config(vocab_size=VOCAB_SIZE, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=2,
                      num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=16,
                      dropout_rate=0.1, layer_norm_epsilon=1e-6,
                      feed_forward_proj="relu" if tied else "gated-gelu", tie_word_embeddings=tied,
                      pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    model = T5ForConditionalGeneration(config)
    out_dir = os.path.join(out_root, name)
    shutil.rmtree(out_dir, ignore_errors=True)
    model.save_pretrained(out_dir)
    if not tied:
        untie(out_dir, config)
        model = T5ForConditionalGeneration.from_pretrained(out_dir)
        assert model.lm_head.weight.data_ptr() != model.shared.weight.data_ptr()
    model.eval()
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(tokenizer_config(), f, indent=2)
        f.write("\n")

    ids, mask, labels = batch(tok)
    ref = {"input_ids": ids, "attention_mask": mask, "labels": labels,
           "decoder_input_ids": model._shift_right(labels)}
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    ref["encoder_hidden"] = out.encoder_last_hidden_state.detach()
    ref["logits"] = out.logits.detach()
    ref["loss"] = out.loss.detach()
    model.zero_grad()
    out.loss.backward()
    for n, p in model.named_parameters():
        assert p.grad is not None, n
        ref[f"grad.{n}"] = p.grad.detach().clone()

    prompt = torch.tensor([tok.encode("translate: the house").ids])
    ref["greedy.input_ids"] = prompt
    ref["greedy.output"] = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt),
                                          max_new_tokens=10, do_sample=False, num_beams=1)

    # PEFT: every attention and feed-forward linear present, B non-zero so the adapter shows.
    targets = ["q", "k", "v", "o", "wi", "wo"] if tied else ["q", "k", "v", "o", "wi_0", "wi_1", "wo"]
    lora = LoraConfig(task_type="SEQ_2_SEQ_LM", r=4, lora_alpha=8, target_modules=targets,
                      init_lora_weights=False)
    peft_model = get_peft_model(model, lora)
    peft_model.eval()
    out = peft_model(input_ids=ids, attention_mask=mask, labels=labels)
    ref["lora.logits"] = out.logits.detach()
    ref["lora.loss"] = out.loss.detach()
    peft_model.zero_grad()
    out.loss.backward()
    for n, p in peft_model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, n
            ref[f"lora.grad.{n}"] = p.grad.detach().clone()
    with torch.no_grad():
        ref["lora.greedy.output"] = peft_model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt),
                                                        max_new_tokens=10, do_sample=False, num_beams=1)
    peft_model.save_pretrained(os.path.join(out_dir, "lora"))
    readme = os.path.join(out_dir, "lora", "README.md")
    if os.path.exists(readme):
        os.remove(readme)

    ref = {k: v.contiguous().float() if v.is_floating_point() else v.contiguous().long() for k, v in ref.items()}
    save_file(ref, os.path.join(out_dir, "reference.safetensors"))
    print(name, "greedy:", ref["greedy.output"].tolist(), "lora greedy:", ref["lora.greedy.output"].tolist(),
          "loss:", float(ref["loss"]), "lora loss:", float(ref["lora.loss"]),
          "lora targets:", sorted(peft_model.peft_config["default"].target_modules))


def main():
    # PEFT keeps target_modules in a set: a fixed hash seed keeps adapter_config.json stable.
    if os.environ.get("PYTHONHASHSEED") != "0":
        os.execve(sys.executable, [sys.executable] + sys.argv, {**os.environ, "PYTHONHASHSEED": "0"})
    torch.set_num_threads(1)
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="tests/fixtures/t5")
    args = ap.parse_args()
    torch.use_deterministic_algorithms(True)
    os.makedirs(args.out, exist_ok=True)
    tok = unigram_tokenizer()
    for name in ["t5-tied", "t5-gated"]:
        make(name, args.out, tok)


if __name__ == "__main__":
    main()
