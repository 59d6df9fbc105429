#!/usr/bin/env python3
"""Generate tiny Hugging Face model fixtures and PyTorch reference outputs.

Writes, under --out (default: tests/fixtures next to this repository's scripts/):

  models/<name>/            llama, llama3, mistral, qwen2, qwen3, phi3: config.json, model.safetensors,
                            generation_config.json, tokenizer.json, tokenizer_config.json,
                            reference.safetensors, lora/ (PEFT adapter); llama also lora-rs/
  models/llama-sharded/     the llama weights again, split into several shards + index
  chat_templates.json       chat-template renderings and tokenizer encodings

Everything is computed on the CPU in float32 with torch + transformers + PEFT and is
byte-for-byte reproducible for the versions pinned in scripts/requirements-fixtures.txt.
tests/fixtures/README.md documents the layout, tensor names and seeds.

Usage: python scripts/make_fixtures.py [--out DIR] [--only TARGET ...]
"""
import argparse
import hashlib
import json
import os
import random
import shutil
import sys
import warnings

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

# transformers' Qwen2Tokenizer pre-tokenization pattern (models/qwen2/tokenization_qwen2.py).
QWEN2_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(REPO_ROOT, "tests", "fixtures")

# Versions the recorded fixtures were produced with; a mismatch only warns, because the
# point of a mismatch run is usually to see whether anything changed.
PINNED = {"torch": "2.15.0", "transformers": "5.24.0", "peft": "0.21.2",
          "safetensors": "0.8.0", "tokenizers": "0.23.3"}

CORPUS_SEED = 1234
TARGET_VOCAB = 512
BATCH, SEQ_LEN = 2, 10
PROMPT_LEN, NEW_TOKENS = 6, 8
# input_ids are drawn from [FIRST_INPUT_ID, vocab): ids 0..3 are <unk> <s> </s> <pad>. <pad> is
# excluded too because transformers builds nn.Embedding(padding_idx=pad_token_id), whose
# backward silently drops the gradient of that row -- a PyTorch quirk the Rust side should
# not have to reproduce.
FIRST_INPUT_ID = 4
# Ids 0..3 in every tokenizer, in this order (Llama convention: unk=0, bos=1, eos=2).
BASE_SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]

# --------------------------------------------------------------------------------------
# Chat templates. transformers renders them with jinja2 trim_blocks=True and
# lstrip_blocks=True; the mistral template relies on exactly that (indented block tags,
# newlines after block tags), the others use explicit {%- -%} whitespace control, so
# between them they catch a renderer configured differently from transformers.
# --------------------------------------------------------------------------------------
LLAMA_TEMPLATE = (
    "{{- bos_token }}\n"
    "{%- for message in messages %}\n"
    "{{- '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' }}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "{{- '<|assistant|>\\n' }}\n"
    "{%- endif %}"
)
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}\n"
    "    {% if message['role'] not in ['system', 'user', 'assistant'] %}\n"
    "        {{ raise_exception('unknown role: ' + message['role']) }}\n"
    "    {% endif %}\n"
    "<|{{ message['role'] }}|>\n"
    "{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}\n"
    "{% if add_generation_prompt %}\n"
    "<|assistant|>\n"
    "{% endif %}"
)
# Llama 3 style: the content is trimmed (as in Meta's template) and BOS is emitted by the
# template, not by the tokenizer's post-processor.
LLAMA3_TEMPLATE = (
    "{%- for message in messages %}\n"
    "{%- set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + message['content'] | trim + '<|eot_id|>' %}\n"
    "{%- if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}\n"
    "{{- content }}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}\n"
    "{%- endif %}"
)
# ChatML as in Qwen2-Instruct, including its default system prompt when the conversation
# has none (the real template does this, and it is easy to forget).
QWEN2_TEMPLATE = (
    "{%- for message in messages %}\n"
    "{%- if loop.first and message['role'] != 'system' %}\n"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}\n"
    "{%- endif %}\n"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "{{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}"
)

# Phi-3 style: a turn is '<|role|>\n' + content + '<|end|>\n'; a finished conversation ends in
# eos_token, an open one with the assistant header.
PHI3_TEMPLATE = (
    "{%- for message in messages %}\n"
    "{%- if message['role'] in ['system', 'user', 'assistant'] %}\n"
    "{{- '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' }}\n"
    "{%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "{{- '<|assistant|>\\n' }}\n"
    "{%- else %}\n"
    "{{- eos_token }}\n"
    "{%- endif %}"
)

# Gemma style: '<start_of_turn>' + role ('model' for the assistant) + '\n' + content +
# '<end_of_turn>\n', BOS first; a system message is folded into the first user turn.
GEMMA_TEMPLATE = (
    "{{- bos_token }}\n"
    "{%- if messages[0]['role'] == 'system' %}\n"
    "{%- set first = messages[0]['content'] + '\\n\\n' %}{%- set rest = messages[1:] %}\n"
    "{%- else %}{%- set first = '' %}{%- set rest = messages %}{%- endif %}\n"
    "{%- for message in rest %}\n"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] %}\n"
    "{{- '<start_of_turn>' + role + '\\n' + (first if loop.first else '') + message['content'] + '<end_of_turn>\\n' }}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "{{- '<start_of_turn>model\\n' }}\n"
    "{%- endif %}"
)

# initializer_range 0.2 instead of the usual 0.02: at 0.02 the residual stream of such a
# shallow model is almost just the token embedding, so the tied-embedding models greedily
# repeat their last token forever (a useless KV-cache test) and top-2 logit margins get
# small enough (~1e-4) for float32 noise to flip an argmax.
COMMON_ARCH = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5, max_position_embeddings=128,
    hidden_act="silu", initializer_range=0.2, attention_dropout=0.0,
)
# Greedy references are only useful if a float32 reimplementation takes the same argmax.
MIN_GREEDY_MARGIN = 1e-3

# seed: base of all per-model seeds (see seeds_for). add_bos: whether the tokenizer's
# post-processor prepends <s> (Qwen2 never adds BOS; the others do, like Llama/Mistral).
MODEL_SPECS = {
    "llama": dict(
        arch="LlamaForCausalLM", seed=100, template=LLAMA_TEMPLATE, add_bos=True,
        extra_specials=["<|system|>", "<|user|>", "<|assistant|>"], eos_extra=None,
        config=dict(rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                    tie_word_embeddings=False, attention_bias=False, mlp_bias=False),
        rslora=True,
    ),
    "llama3": dict(
        arch="LlamaForCausalLM", seed=200, template=LLAMA3_TEMPLATE, add_bos=True,
        extra_specials=["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        eos_extra="<|eot_id|>",
        # original_max_position_embeddings is 64, not 32: with head_dim 16 and theta 5e5 the
        # wavelengths are 6.3, 32.4, 167, ...; with 32 the smoothed (medium) band
        # [32/4, 32/1] would be empty and that branch of the llama3 formula untested.
        config=dict(rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                     "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                     "original_max_position_embeddings": 64},
                    tie_word_embeddings=True, attention_bias=False, mlp_bias=False),
        rslora=False,
    ),
    "mistral": dict(
        arch="MistralForCausalLM", seed=300, template=MISTRAL_TEMPLATE, add_bos=True,
        extra_specials=["<|system|>", "<|user|>", "<|assistant|>"], eos_extra=None,
        # sliding_window < SEQ_LEN so that the window changes the reference logits.
        config=dict(rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                    tie_word_embeddings=False, sliding_window=6),
        rslora=False,
    ),
    "qwen2": dict(
        arch="Qwen2ForCausalLM", seed=400, template=QWEN2_TEMPLATE, add_bos=False, qwen2_pretokenizer=True,
        extra_specials=["<|im_start|>", "<|im_end|>"], eos_extra="<|im_end|>",
        config=dict(rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                    tie_word_embeddings=True, use_sliding_window=False),
        rslora=False,
    ),
    # Qwen3: per-head RMSNorm on queries and keys (q_norm/k_norm, perturbed like every norm),
    # no q/k/v biases, untied head (so the head's gradient is checked too).
    "qwen3": dict(
        arch="Qwen3ForCausalLM", seed=500, template=QWEN2_TEMPLATE, add_bos=False, qwen2_pretokenizer=True,
        extra_specials=["<|im_start|>", "<|im_end|>"], eos_extra="<|im_end|>",
        config=dict(rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
                    tie_word_embeddings=False, use_sliding_window=False, attention_bias=False),
        rslora=False,
    ),
    # Phi-3: fused qkv_proj and gate_up_proj (LoRA targets them by those names, as PEFT does),
    # LongRoPE as in Phi-3-128k/Phi-3.5 with an original context of 4 tokens, so that every
    # reference forward (10 tokens, greedy from a 6-token prompt) uses the long factors and the
    # extra `short_logits` (first 4 tokens) the short ones; a sliding window shorter than the
    # sequence; untied head.
    "phi3": dict(
        arch="Phi3ForCausalLM", seed=600, template=PHI3_TEMPLATE, add_bos=True,
        extra_specials=["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"], eos_extra="<|end|>",
        config=dict(rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                                     "short_factor": [1.0, 1.1, 1.3, 1.6, 2.0, 2.5, 3.0, 3.5],
                                     "long_factor": [1.0, 1.5, 2.5, 4.0, 6.0, 9.0, 13.0, 18.0],
                                     "original_max_position_embeddings": 4},
                    original_max_position_embeddings=4, tie_word_embeddings=False, sliding_window=6),
        lora_targets=["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
        rslora=False,
    ),
    # Gemma 2: (1 + w) norms before and after attention and the MLP, GeGLU (tanh GELU),
    # embeddings times sqrt(hidden), attention scaled by query_pre_attn_scalar^-0.5 (24, not
    # head_dim), attention-logit and final-logit soft-capping small enough to bind, a 6-token
    # window on layer 0 only. Untied embeddings: tied (as real Gemma models are; gemma3 covers
    # it), this 2-layer model greedily repeats one token, a useless decoding reference.
    "gemma2": dict(
        arch="Gemma2ForCausalLM", seed=700, template=GEMMA_TEMPLATE, add_bos=True,
        extra_specials=["<start_of_turn>", "<end_of_turn>"], eos_extra="<end_of_turn>",
        config=dict(rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                    hidden_act="gelu_pytorch_tanh", hidden_activation="gelu_pytorch_tanh",
                    query_pre_attn_scalar=24, attn_logit_softcapping=5.0, final_logit_softcapping=20.0,
                    sliding_window=6, layer_types=["sliding_attention", "full_attention"],
                    tie_word_embeddings=False),
        rslora=False,
    ),
    # Gemma 3 (text): as Gemma 2 without soft-capping, plus (1 + w) per-head query/key norms and a
    # RoPE per layer type (local theta 10000; global theta 1e6 with linear scaling 4). Untied for
    # the same reason as gemma2 (the tied head is the path llama3 and qwen2 cover).
    "gemma3": dict(
        arch="Gemma3ForCausalLM", seed=800, template=GEMMA_TEMPLATE, add_bos=True,
        extra_specials=["<start_of_turn>", "<end_of_turn>"], eos_extra="<end_of_turn>",
        config=dict(rope_parameters={
                        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                        "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1000000.0}},
                    hidden_act="gelu_pytorch_tanh", hidden_activation="gelu_pytorch_tanh",
                    query_pre_attn_scalar=24, sliding_window=6,
                    layer_types=["sliding_attention", "full_attention"], tie_word_embeddings=False),
        rslora=False,
    ),
    # Mixture of experts. Four experts, two per token, experts of width 32; the load-balancing
    # loss is in the reference loss (output_router_logits) with a coefficient large enough for its
    # gradient to matter. The LoRA fixtures adapt the stacked experts (PEFT target_parameters) and
    # save the routers whole (modules_to_save "gate"). Mixtral: Mistral attention, renormalized
    # top-k. Qwen2-MoE: q/k/v biases, a shared expert behind a sigmoid gate, top-k not
    # renormalized. Qwen3-MoE: per-head q/k norms, renormalized top-k, and layer 1 dense
    # (mlp_only_layers), so that both kinds of layer are covered.
    "mixtral": dict(
        arch="MixtralForCausalLM", seed=900, template=MISTRAL_TEMPLATE, add_bos=True,
        extra_specials=["<|system|>", "<|user|>", "<|assistant|>"], eos_extra=None,
        config=dict(rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                    tie_word_embeddings=False, intermediate_size=32, num_local_experts=4,
                    num_experts_per_tok=2, output_router_logits=True, router_aux_loss_coef=0.05),
        lora_targets=["q_proj", "k_proj", "v_proj", "o_proj"],
        lora_parameters=["gate_up_proj", "down_proj"], lora_save=["gate"],
        rslora=False,
    ),
    "qwen2_moe": dict(
        arch="Qwen2MoeForCausalLM", seed=1000, template=QWEN2_TEMPLATE, add_bos=False, qwen2_pretokenizer=True,
        extra_specials=["<|im_start|>", "<|im_end|>"], eos_extra="<|im_end|>",
        config=dict(rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                    tie_word_embeddings=False, use_sliding_window=False, moe_intermediate_size=32,
                    shared_expert_intermediate_size=64, num_experts=4, num_experts_per_tok=2,
                    norm_topk_prob=False, output_router_logits=True, router_aux_loss_coef=0.05),
        lora_parameters=["gate_up_proj", "down_proj"], lora_save=["gate"],
        rslora=False,
    ),
    "qwen3_moe": dict(
        arch="Qwen3MoeForCausalLM", seed=1100, template=QWEN2_TEMPLATE, add_bos=False, qwen2_pretokenizer=True,
        extra_specials=["<|im_start|>", "<|im_end|>"], eos_extra="<|im_end|>",
        config=dict(rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
                    tie_word_embeddings=False, use_sliding_window=False, attention_bias=False,
                    moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2, norm_topk_prob=True,
                    mlp_only_layers=[1], output_router_logits=True, router_aux_loss_coef=0.05),
        lora_parameters=["gate_up_proj"], lora_save=["gate"],
        rslora=False,
    ),
}
TARGETS = list(MODEL_SPECS) + ["chat_templates"]
# How far apart the k-th and (k+1)-th router logits of every fixture token must be, so that
# float32 noise cannot change which experts a token goes to.
MIN_ROUTING_MARGIN = 1e-3
ROUTER_STD = 0.5

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA_R, LORA_ALPHA = 4, 8
LORA_B_STD = 0.05
NORM_STD = 0.1
BIAS_STD = 0.1
# Small enough that the ~550 KB llama checkpoint is split into several files.
SHARD_SIZE = "200KB"


def seeds_for(spec):
    """All seeds of one model, derived from its base seed so that they are listed in one place."""
    s = spec["seed"]
    return dict(weights=s, perturb=s + 1, input_ids=s + 2, lora_init=s + 3, lora_b=s + 4,
                rslora_init=s + 5, rslora_b=s + 6)


# --------------------------------------------------------------------------------------
# Corpus and tokenizer
# --------------------------------------------------------------------------------------
_VOCAB_WORDS = """
model token layer weight tensor gradient adapter rank batch learn train step loss value
query key head cache window rotary norm scale shift merge vocab byte text chat user system
assistant reply answer question data file shard index config epoch rate warm decay clip
the a an of to in on for with by from at as is are was be it this that these we you they
and or not but if then else when while all any some many few each every more most less
good fast slow small large tiny huge first last next new old long short high low right left
cat dog bird fish tree river stone cloud rain snow sun moon star light dark red green blue
run walk jump read write speak think make take give find keep hold turn open close begin end
""".split()
_SYLLABLES = ["ka", "lo", "mi", "ne", "ru", "ta", "shi", "qua", "bre", "dor", "fen", "gal",
              "hur", "jin", "kel", "mor", "pax", "ven", "wil", "zor", "an", "el", "is", "on"]


def build_corpus(n_lines=4000):
    """Synthetic English-ish text: real words, made-up words, numbers, punctuation and a
    little non-ASCII, so that the byte-level BPE learns a mix of merges."""
    rng = random.Random(CORPUS_SEED)
    made_up = ["".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 3))) for _ in range(400)]
    lexicon = _VOCAB_WORDS + made_up
    # Zipf-like frequencies so that a few hundred merges cover frequent whole words.
    weights = [1.0 / (i + 1) for i in range(len(lexicon))]
    extras = ["café", "naïve", "über", "año", "日本", "😀"]
    lines = []
    for _ in range(n_lines):
        words = rng.choices(lexicon, weights=weights, k=rng.randint(3, 14))
        if rng.random() < 0.2:
            words.insert(rng.randrange(len(words) + 1), str(rng.randint(0, 9999)))
        if rng.random() < 0.05:
            words.insert(rng.randrange(len(words) + 1), rng.choice(extras))
        line = " ".join(words)
        lines.append(line[0].upper() + line[1:] + rng.choice([".", ".", "?", "!", ",", ":"]))
    return lines


def train_tokenizer(corpus, extra_specials, add_bos, qwen2_pretokenizer=False):
    """Byte-level BPE with exactly TARGET_VOCAB entries, special tokens first.

    The full byte alphabet is given up front, so token ids do not depend on which bytes the
    corpus happens to contain (and the training is deterministic).

    For Qwen2, transformers (seeing model_type qwen2) loads the tokenizer as Qwen2Tokenizer, which
    replaces the pre-tokenizer with Qwen2's own (a digit-by-digit split regex, then byte-level
    without regex, after NFC); the saved tokenizer.json must already have it, or transformers and
    the tokenizers library would disagree."""
    specials = BASE_SPECIALS + extra_specials
    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    if qwen2_pretokenizer:
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TARGET_VOCAB, min_frequency=2, special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer, length=len(corpus))
    assert [tok.token_to_id(t) for t in specials] == list(range(len(specials))), "special ids moved"
    if add_bos:
        bos = tok.token_to_id("<s>")
        tok.post_processor = processors.TemplateProcessing(
            single="<s>:0 $A:0", pair="<s>:0 $A:0 <s>:1 $B:1", special_tokens=[("<s>", bos)])
    return tok


def write_tokenizer(out_dir, tok, spec):
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    write_json(os.path.join(out_dir, "tokenizer_config.json"), {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>",
        # transformers 5 rebuilds the post-processor from these two flags when they are
        # present, so they must agree with tokenizer.json (checked in check_tokenizer).
        "add_bos_token": spec["add_bos"], "add_eos_token": False,
        "model_max_length": COMMON_ARCH["max_position_embeddings"],
        "clean_up_tokenization_spaces": False,
        "chat_template": spec["template"],
    })


# --------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------
def model_class(arch):
    import transformers
    return getattr(transformers, arch)


def build_config(spec, tok):
    cls = model_class(spec["arch"]).config_class
    return cls(
        vocab_size=tok.get_vocab_size(), **{**COMMON_ARCH, **spec["config"]},
        bos_token_id=tok.token_to_id("<s>"), eos_token_id=tok.token_to_id("</s>"),
        pad_token_id=tok.token_to_id("<pad>"),
    )


def build_model(spec, config):
    """Model from its own initializer, then norms (and biases) moved away from their
    trivial init values, which would otherwise hide e.g. a missing norm weight."""
    seeds = seeds_for(spec)
    torch.manual_seed(seeds["weights"])
    model = model_class(spec["arch"])(config).to(torch.float32)
    gen = torch.Generator().manual_seed(seeds["perturb"])
    with torch.no_grad():
        for module in model.modules():
            if type(module).__name__.endswith("RMSNorm"):
                # Gemma's norms scale by (1 + weight), so these scale by about 2: enough for the
                # layers of a 2-layer model to outweigh its embeddings (times sqrt(hidden)).
                module.weight.copy_(1.0 + NORM_STD * torch.randn(module.weight.shape, generator=gen))
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.copy_(BIAS_STD * torch.randn(p.shape, generator=gen))
            # Qwen's routers start at zero (every expert tied): random routers spread the tokens.
            if name.endswith("mlp.gate.weight"):
                p.copy_(ROUTER_STD * torch.randn(p.shape, generator=gen))
    return model.eval()


def save_model(model, spec, tok, out_dir):
    if spec["eos_extra"]:
        # Like Llama-3/Qwen2 instruct checkpoints: generation also stops at the turn terminator.
        model.generation_config.eos_token_id = [tok.token_to_id("</s>"), tok.token_to_id(spec["eos_extra"])]
    model.save_pretrained(out_dir)


def load_model(spec, model_dir, attn="eager", **overrides):
    # Eager attention is the plain softmax(QK^T/sqrt(d) + mask) V reference, and the one
    # path in which every masking feature (sliding window included) is applied explicitly.
    model = model_class(spec["arch"]).from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation=attn, **overrides)
    return model.eval()


def assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys(), (sorted(sa.keys() ^ sb.keys()))
    for k in sa:
        assert torch.equal(sa[k], sb[k]), f"weight {k} changed in save/load round trip"


# --------------------------------------------------------------------------------------
# References
# --------------------------------------------------------------------------------------
def make_input_ids(spec, vocab_size):
    gen = torch.Generator().manual_seed(seeds_for(spec)["input_ids"])
    return torch.randint(FIRST_INPUT_ID, vocab_size, (BATCH, SEQ_LEN), generator=gen, dtype=torch.int64)


def forward_with_grads(model, input_ids, grad_name):
    """logits, transformers' own shifted mean CE loss, and d(loss)/d(param) for every
    trainable parameter; grad_name maps a parameter name to its reference key."""
    with torch.no_grad():
        logits = model(input_ids=input_ids).logits
    model.zero_grad(set_to_none=True)
    out = model(input_ids=input_ids, labels=input_ids)
    assert torch.equal(out.logits, logits), "logits differ between the loss and no-grad passes"
    out.loss.backward()
    grads = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        key = grad_name(name)
        assert p.grad is not None, f"no gradient for {name}"
        grads[key] = p.grad
    model.zero_grad(set_to_none=True)
    return logits, out.loss.detach(), grads


def greedy(model, prompt, label):
    """8 greedy tokens from transformers' generate (KV cache), checked against a plain
    argmax loop that recomputes the full sequence, so that the reference means exactly
    'argmax of the full forward pass': EOS does not stop it and no logits processor
    (min_new_tokens would mask EOS) is involved."""
    with torch.no_grad():
        out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt),
                             max_new_tokens=NEW_TOKENS, do_sample=False, use_cache=True,
                             eos_token_id=None, pad_token_id=None)
        new = out[:, prompt.shape[1]:]
        ids, margins = prompt, []
        for _ in range(NEW_TOKENS):
            top2 = model(input_ids=ids, use_cache=False).logits[0, -1].topk(2)
            margins.append((top2.values[0] - top2.values[1]).item())
            ids = torch.cat([ids, top2.indices[:1].view(1, 1)], dim=1)
    assert torch.equal(new, ids[:, prompt.shape[1]:]), (
        f"generate (KV cache) {new.tolist()} != argmax loop {ids[:, prompt.shape[1]:].tolist()}")
    assert min(margins) > MIN_GREEDY_MARGIN, f"greedy top-2 margin {min(margins):.2e} too small"
    print(f"  {label} greedy {new[0].tolist()}, smallest top-2 logit margin {min(margins):.2e}")
    return new


def base_references(spec, model_dir, input_ids):
    model = load_model(spec, model_dir)
    logits, loss, grads = forward_with_grads(model, input_ids, lambda n: "grad." + n)
    ref = {"input_ids": input_ids, "logits": logits, "loss": loss}
    ref.update(grads)
    ref["greedy_ids"] = greedy(model, input_ids[:1, :PROMPT_LEN], "base")
    # Not stored: how far transformers' default (SDPA) path is from eager, as a sense of the
    # float32 noise floor a Rust comparison has to tolerate.
    if model._supports_sdpa:  # Gemma 2 has none (SDPA cannot soft-cap)
        sdpa = load_model(spec, model_dir, attn="sdpa")
        with torch.no_grad():
            diff = (sdpa(input_ids=input_ids).logits - logits).abs().max().item()
        print(f"  eager vs sdpa logits max |diff| = {diff:.3e}")
    return ref


def lora_config(spec, rslora):
    from peft import LoraConfig
    targets = spec.get("lora_targets", LORA_TARGETS)
    return LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules=targets,
                      bias="none", task_type="CAUSAL_LM", use_rslora=rslora,
                      target_parameters=spec.get("lora_parameters"), modules_to_save=spec.get("lora_save"))


def make_adapter(spec, model_dir, adapter_dir, rslora):
    """PEFT adapter with lora_A from PEFT's init and nonzero lora_B (PEFT's zero B would make
    the adapter a no-op and every LoRA test vacuous)."""
    from peft import get_peft_model
    seeds = seeds_for(spec)
    base = load_model(spec, model_dir)
    torch.manual_seed(seeds["rslora_init" if rslora else "lora_init"])
    peft_model = get_peft_model(base, lora_config(spec, rslora))
    gen = torch.Generator().manual_seed(seeds["rslora_b" if rslora else "lora_b"])
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if ".lora_B." in name:
                p.copy_(LORA_B_STD * torch.randn(p.shape, generator=gen))
    # PEFT would record the absolute path the base was loaded from; a repo-relative one keeps
    # the file independent of --out and of the machine.
    peft_model.peft_config["default"].base_model_name_or_path = f"tests/fixtures/models/{spec['name']}"
    peft_model.save_pretrained(adapter_dir)
    # PEFT's generic model card: boilerplate, not fixture data.
    os.remove(os.path.join(adapter_dir, "README.md"))
    sort_target_modules(os.path.join(adapter_dir, "adapter_config.json"))


def sort_target_modules(path):
    """PEFT stores target_modules as a set, so the saved list order follows Python's string
    hashing; sorted, the file is stable and readable. Same format PEFT writes
    (indent 2, sorted keys, no trailing newline)."""
    with open(path) as f:
        cfg = json.load(f)
    cfg["target_modules"] = sorted(cfg["target_modules"])
    for key in ("target_parameters", "modules_to_save"):
        if cfg.get(key):
            cfg[key] = sorted(cfg[key])
    with open(path, "w") as f:
        f.write(json.dumps(cfg, indent=2, sort_keys=True))


def lora_references(spec, model_dir, adapter_dir, input_ids, prefix):
    """References with the saved adapter loaded back from disk (unmerged), so they describe
    exactly the files a consumer reads."""
    from peft import PeftModel
    base = load_model(spec, model_dir)
    model = PeftModel.from_pretrained(base, adapter_dir, is_trainable=True).eval()
    with safe_open(os.path.join(adapter_dir, "adapter_model.safetensors"), "pt") as f:
        saved_keys = set(f.keys())

    def grad_name(name):
        # Parameter names carry the adapter name (".default."); the saved file does not, nor the
        # wrapper of a module saved whole (".modules_to_save.default.").
        key = name.replace(".modules_to_save.default.", ".").replace(".default.", ".")
        assert key in saved_keys, f"{key} not in adapter file"
        return f"{prefix}_grad.{key}"

    logits, loss, grads = forward_with_grads(model, input_ids, grad_name)
    assert len(grads) == len(saved_keys), "trainable LoRA params != saved adapter tensors"
    ref = {f"{prefix}_logits": logits, f"{prefix}_loss": loss}
    ref.update(grads)
    if prefix == "lora":
        ref["lora_greedy_ids"] = greedy(model, input_ids[:1, :PROMPT_LEN], "lora")
    return ref


def check_sliding_window(spec, model_dir, input_ids, logits):
    """The window must matter for the reference, or the Rust test of it proves nothing."""
    window = spec["config"]["sliding_window"]
    layer_types = spec["config"].get("layer_types")
    if layer_types:
        # Gemma: the window applies to the "sliding_attention" layers (layer 0 here).
        assert layer_types[0] == "sliding_attention"
        # A window as long as the sequence; switching the layer type would switch Gemma 3's RoPE too.
        full = load_model(spec, model_dir, sliding_window=SEQ_LEN)
    else:
        full = load_model(spec, model_dir, sliding_window=None)
        assert full.config.sliding_window is None
    with torch.no_grad():
        full_logits = full(input_ids=input_ids).logits
        # Independent of the masking code path: how many keys the last query attends to.
        model = load_model(spec, model_dir)
        attn = model(input_ids=input_ids, output_attentions=True).attentions[0]
    diff = (full_logits - logits).abs()
    within = diff[:, :window].max().item()
    beyond = diff[:, window:].max().item()
    keys = (attn[0, 0, -1] > 0).nonzero().flatten().tolist()
    print(f"  sliding_window={window} vs None: max |diff| positions < {window}: {within:.3e}, "
          f">= {window}: {beyond:.3e}; last query attends to key positions {keys}")
    assert within == 0.0 and beyond > 1e-3, "sliding window is not applied as expected"
    assert keys == list(range(SEQ_LEN - window, SEQ_LEN)), "window is not the last `window` keys"


def check_rope_scaling(spec, model_dir, input_ids, logits):
    """All three llama3 frequency bands (kept, smoothed, divided by factor) must occur, and
    the scaling must change the logits, or a Rust test could pass with plain RoPE."""
    import math
    rp = spec["config"]["rope_parameters"]
    dim = COMMON_ARCH["head_dim"]
    inv_freq = 1.0 / (rp["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    wavelen = 2 * math.pi / inv_freq
    high = rp["original_max_position_embeddings"] / rp["high_freq_factor"]
    low = rp["original_max_position_embeddings"] / rp["low_freq_factor"]
    bands = {"kept": int((wavelen < high).sum()), "smoothed": int(((wavelen >= high) & (wavelen <= low)).sum()),
             "divided": int((wavelen > low).sum())}
    plain = load_model(spec, model_dir, rope_parameters={"rope_type": "default", "rope_theta": rp["rope_theta"]})
    with torch.no_grad():
        diff = (plain(input_ids=input_ids).logits - logits).abs().max().item()
    print(f"  llama3 rope bands over {dim // 2} frequencies: {bands}; vs unscaled rope logits max |diff| {diff:.3e}")
    assert all(bands.values()) and diff > 1e-3, "llama3 rope scaling is not exercised"


def check_longrope(spec, model_dir, input_ids, logits):
    """Logits of a forward no longer than the original context (LongRoPE's short factors),
    checked to differ from the same positions in the full forward (long factors), or a Rust
    test could pass with one set of factors for both."""
    short = spec["config"]["rope_parameters"]["original_max_position_embeddings"]
    model = load_model(spec, model_dir)
    with torch.no_grad():
        short_logits = model(input_ids=input_ids[:, :short]).logits
    diff = (short_logits - logits[:, :short]).abs().max().item()
    print(f"  longrope: first {short} positions, short vs long factors logits max |diff| {diff:.3e}")
    assert diff > 1e-3, "longrope short and long factors give the same logits"
    return short_logits


def check_softcapping(spec, model_dir, input_ids, logits):
    """Each soft-cap must change the logits, or a Rust test could pass without it."""
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        uncapped = load_model(spec, model_dir, **{key: None})
        with torch.no_grad():
            diff = (uncapped(input_ids=input_ids).logits - logits).abs().max().item()
        print(f"  {key}={spec['config'][key]} vs none: logits max |diff| {diff:.3e}")
        assert diff > 1e-3, f"{key} does not bind"


def check_local_rope(spec, model_dir, input_ids, logits):
    """Gemma 3's sliding layers have their own RoPE: using the global one must change the logits."""
    import copy
    rope = copy.deepcopy(spec["config"]["rope_parameters"])
    rope["sliding_attention"] = dict(rope["full_attention"])
    one_rope = load_model(spec, model_dir, rope_parameters=rope)
    with torch.no_grad():
        diff = (one_rope(input_ids=input_ids).logits - logits).abs().max().item()
    print(f"  local vs global RoPE on the sliding layers: logits max |diff| {diff:.3e}")
    assert diff > 1e-3, "the sliding layers' RoPE does not matter"


def check_routing(spec, model_dir, input_ids):
    """Every expert of every MoE layer gets tokens (so that every expert weight has a gradient),
    no token is near a tie between its k-th and (k+1)-th expert, and the load-balancing loss (in the
    reference loss) is stored on its own."""
    model = load_model(spec, model_dir)
    k = spec["config"]["num_experts_per_tok"]
    with torch.no_grad():
        out = model(input_ids=input_ids, output_router_logits=True)
    assert out.router_logits, "no router logits"
    for layer, logits in enumerate(out.router_logits):
        # Softmax is monotonic: the router logits' gap is the margin float32 noise has to cross.
        top = logits.float().topk(k + 1, dim=-1).values
        margin = (top[:, k - 1] - top[:, k]).min().item()
        hit = torch.bincount(logits.topk(k, dim=-1).indices.flatten(), minlength=logits.shape[-1])
        assert margin > MIN_ROUTING_MARGIN, f"router layer {layer}: top-k margin {margin:.2e}"
        assert (hit > 0).all(), f"router layer {layer}: experts without tokens {hit.tolist()}"
        print(f"  router {layer}: tokens per expert {hit.tolist()}, smallest top-k margin {margin:.2e}")
    return {"aux_loss": out.aux_loss.detach()}


def check_tied_embeddings(spec, model_dir, ref):
    """With tied embeddings transformers neither saves lm_head.weight nor lists it as a
    parameter, so its gradient is folded into grad.model.embed_tokens.weight."""
    tied = spec["config"]["tie_word_embeddings"]
    with safe_open(os.path.join(model_dir, "model.safetensors"), "pt") as f:
        saved = "lm_head.weight" in f.keys()
    assert saved == (not tied) and ("grad.lm_head.weight" in ref) == (not tied), "unexpected lm_head handling"


def save_reference(path, tensors, meta):
    tensors = {k: v.detach().contiguous().clone() for k, v in tensors.items()}
    for k, v in tensors.items():
        assert v.dtype in (torch.float32, torch.int64), (k, v.dtype)
    # One metadata key holding JSON: safetensors writes the metadata map in hash order, so
    # with several keys the header (and the file hash) would change from run to run.
    save_file(tensors, path, metadata={"fixture": json.dumps(meta, sort_keys=True)})


# --------------------------------------------------------------------------------------
# One model directory
# --------------------------------------------------------------------------------------
def check_tokenizer(model_dir):
    """transformers must tokenize exactly like the tokenizers library (which is what the Rust
    side uses), including the add_bos_token handling that transformers 5 layers on top."""
    from transformers import AutoTokenizer
    hf = AutoTokenizer.from_pretrained(model_dir)
    raw = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
    for text in PLAIN_TEXTS:
        for special in (True, False):
            a = hf(text, add_special_tokens=special)["input_ids"]
            b = raw.encode(text, add_special_tokens=special).ids
            assert a == b, (model_dir, text, special, a, b)


def fresh_dir(path):
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path)


def generate_model(name, out_root, corpus):
    spec = dict(MODEL_SPECS[name], name=name)
    model_dir = os.path.join(out_root, "models", name)
    print(f"{name}:")
    vocab_size = write_model_files(spec, model_dir, corpus)
    if name == "llama":
        write_sharded_copy(spec, model_dir, os.path.join(out_root, "models", "llama-sharded"))
    write_references(spec, model_dir, vocab_size)


def write_model_files(spec, model_dir, corpus):
    """Tokenizer, config and weights, checked to survive a save/load round trip exactly."""
    fresh_dir(model_dir)
    tok = train_tokenizer(corpus, spec["extra_specials"], spec["add_bos"], spec.get("qwen2_pretokenizer", False))
    write_tokenizer(model_dir, tok, spec)
    check_tokenizer(model_dir)
    config = build_config(spec, tok)
    model = build_model(spec, config)
    save_model(model, spec, tok, model_dir)
    assert_same_weights(model, load_model(spec, model_dir))
    return config.vocab_size


def write_sharded_copy(spec, model_dir, sharded_dir):
    fresh_dir(sharded_dir)
    model = load_model(spec, model_dir)
    model.save_pretrained(sharded_dir, max_shard_size=SHARD_SIZE)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(model_dir, f), sharded_dir)
    n_shards = len([f for f in os.listdir(sharded_dir) if f.startswith("model-")])
    assert n_shards >= 2, "llama-sharded has a single shard"
    assert_same_weights(model, load_model(spec, sharded_dir))
    print(f"  {os.path.basename(sharded_dir)}: {n_shards} shards")


def write_references(spec, model_dir, vocab_size):
    input_ids = make_input_ids(spec, vocab_size)
    ref = base_references(spec, model_dir, input_ids)
    check_tied_embeddings(spec, model_dir, ref)
    if "sliding_window" in spec["config"]:
        check_sliding_window(spec, model_dir, input_ids, ref["logits"])
    if spec["config"]["rope_parameters"].get("rope_type") == "llama3":
        check_rope_scaling(spec, model_dir, input_ids, ref["logits"])
    if "sliding_attention" in spec["config"]["rope_parameters"]:
        check_local_rope(spec, model_dir, input_ids, ref["logits"])
    if spec["config"].get("attn_logit_softcapping"):
        check_softcapping(spec, model_dir, input_ids, ref["logits"])
    if spec["config"]["rope_parameters"].get("rope_type") == "longrope":
        ref["short_logits"] = check_longrope(spec, model_dir, input_ids, ref["logits"])

    if "num_experts_per_tok" in spec["config"]:
        ref.update(check_routing(spec, model_dir, input_ids))

    lora_dir = os.path.join(model_dir, "lora")
    make_adapter(spec, model_dir, lora_dir, rslora=False)
    ref.update(lora_references(spec, model_dir, lora_dir, input_ids, "lora"))
    if spec["rslora"]:
        rs_dir = os.path.join(model_dir, "lora-rs")
        make_adapter(spec, model_dir, rs_dir, rslora=True)
        rs = lora_references(spec, model_dir, rs_dir, input_ids, "rslora")
        ref["rslora_logits"], ref["rslora_loss"] = rs["rslora_logits"], rs["rslora_loss"]

    print(f"  vocab {vocab_size}, loss {ref['loss'].item():.6f}, lora_loss {ref['lora_loss'].item():.6f}, "
          f"lora vs base logits max |diff| {(ref['lora_logits'] - ref['logits']).abs().max().item():.3e}")
    save_reference(os.path.join(model_dir, "reference.safetensors"), ref, {
        "model": spec["name"], "seeds": seeds_for(spec), "versions": library_versions(),
        "loss": "mean next-token cross-entropy over batch*(seq-1) positions, labels = input_ids",
        "greedy": f"greedy_ids = {NEW_TOKENS} new tokens after input_ids[0:1, :{PROMPT_LEN}], prompt excluded",
    })


# --------------------------------------------------------------------------------------
# Chat templates and encodings
# --------------------------------------------------------------------------------------
CONVERSATIONS = [
    ("system_user_assistant", False, [
        {"role": "system", "content": "You are a terse assistant."},
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "4."},
    ]),
    # The trailing newline of the first assistant turn is trimmed by the llama3 template only.
    ("multi_turn", False, [
        {"role": "user", "content": "Hello! Grüße 👋"},
        {"role": "assistant", "content": "Hi there. How can I help?\n"},
        {"role": "user", "content": "Tell me a joke about tensors."},
        {"role": "assistant", "content": "Why did the tensor cross the road? To get broadcast."},
    ]),
    ("user_generation_prompt", True, [
        {"role": "user", "content": "Summarize: the quick brown fox jumps over the lazy dog."},
    ]),
]
PLAIN_TEXTS = [
    "Hello world",
    "",
    "  two leading spaces, trailing space ",
    " a",
    "héllo wörld — naïve café 日本 😀",
    "special </s> and <s> and <pad> inside text",
    "<|im_start|>user\nhi<|im_end|>",
    "<|start_header_id|>user<|end_header_id|>",
    "line one\nline two\ttab 12345 3.14159",
]


def as_ids(encoded):
    # apply_chat_template(tokenize=True) returns a BatchEncoding in transformers 5
    # (return_dict defaults to True) and a plain list in 4.x.
    return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)


def chat_template_references(out_root):
    from transformers import AutoTokenizer
    result = {
        "description": "Reference chat-template renderings and tokenizer encodings; see README.md.",
        "versions": library_versions(),
        "models": {},
    }
    for name in MODEL_SPECS:
        model_dir = os.path.join(out_root, "models", name)
        if not os.path.exists(os.path.join(model_dir, "tokenizer.json")):
            sys.exit(f"chat_templates needs the {name} model in {model_dir}; generate it first")
        tok = AutoTokenizer.from_pretrained(model_dir)
        convs = []
        for conv_name, add_gen, messages in CONVERSATIONS:
            text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_gen)
            ids = as_ids(tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_gen))
            # The ids are the rendered text tokenized without adding special tokens (the
            # template already emits BOS where the model wants one).
            assert ids == tok(text, add_special_tokens=False)["input_ids"], (name, conv_name)
            # ...and the tokenizers library (what the Rust side runs) agrees on the rendered text.
            raw = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
            assert ids == raw.encode(text, add_special_tokens=False).ids, (name, conv_name, "tokenizers")
            convs.append({"name": conv_name, "add_generation_prompt": add_gen, "messages": messages,
                          "text": text, "ids": ids})
        encodings = []
        for text in PLAIN_TEXTS:
            with_special = tok(text, add_special_tokens=True)["input_ids"]
            without = tok(text, add_special_tokens=False)["input_ids"]
            encodings.append({"text": text, "ids_add_special_tokens_true": with_special,
                              "ids_add_special_tokens_false": without,
                              "tokens_add_special_tokens_false": tok.convert_ids_to_tokens(without),
                              "decoded_add_special_tokens_true": tok.decode(with_special)})
        result["models"][name] = {
            "tokenizer_dir": f"models/{name}",
            "special_token_ids": {t: tok.convert_tokens_to_ids(t)
                                  for t in BASE_SPECIALS + MODEL_SPECS[name]["extra_specials"]},
            "conversations": convs,
            "encodings": encodings,
        }
    write_json(os.path.join(out_root, "chat_templates.json"), result, sort_keys=False)
    print("chat_templates.json written")


# --------------------------------------------------------------------------------------
# Utilities
# --------------------------------------------------------------------------------------
def write_json(path, obj, sort_keys=True):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=sort_keys, ensure_ascii=False)
        f.write("\n")


def library_versions():
    import peft
    import safetensors
    import tokenizers
    import transformers
    return {"torch": torch.__version__.split("+")[0], "transformers": transformers.__version__,
            "peft": peft.__version__, "safetensors": safetensors.__version__,
            "tokenizers": tokenizers.__version__}


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def print_digests(out_root):
    total = 0
    for root, dirs, files in os.walk(out_root):
        dirs.sort()
        for f in sorted(files):
            path = os.path.join(root, f)
            if f == "README.md" and root == out_root:
                continue  # hand-written, not generated
            size = os.path.getsize(path)
            total += size
            print(f"{sha256(path)}  {size:>8}  {os.path.relpath(path, out_root)}")
    print(f"total {total} bytes")


def pin_hash_seed():
    """Re-exec with a fixed PYTHONHASHSEED: set iteration order (PEFT's target_modules, and
    whatever else a library keeps in a set) must not change between runs."""
    if os.environ.get("PYTHONHASHSEED") != "0":
        os.environ["PYTHONHASHSEED"] = "0"
        os.execv(sys.executable, [sys.executable] + sys.argv)


def setup_determinism():
    # One thread: float32 reductions split across threads may sum in a different order on
    # another machine; the model is tiny, so this costs nothing.
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    # PEFT 0.21 calls a transformers method that transformers 5.24 deprecates; not our concern.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    # PEFT looks for the base model at base_model_name_or_path (repo-relative, see
    # make_adapter) only to check for a resized vocabulary, which these adapters never have.
    warnings.filterwarnings("ignore", message="Could not find a config file in", category=UserWarning)
    versions = library_versions()
    for lib, want in PINNED.items():
        if versions[lib] != want:
            print(f"warning: {lib} {versions[lib]} != pinned {want}; outputs may differ", file=sys.stderr)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=DEFAULT_OUT, help=f"output root (default: {DEFAULT_OUT})")
    ap.add_argument("--only", nargs="+", choices=TARGETS, metavar="TARGET",
                    help=f"generate only these ({', '.join(TARGETS)}); llama includes llama-sharded, "
                         "chat_templates reads the tokenizers of already generated models")
    args = ap.parse_args()
    pin_hash_seed()
    setup_determinism()
    out_root = os.path.abspath(args.out)
    targets = args.only or TARGETS
    corpus = build_corpus()
    for name in MODEL_SPECS:
        if name in targets:
            generate_model(name, out_root, corpus)
    if "chat_templates" in targets:
        chat_template_references(out_root)
    print_digests(out_root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
