#!/usr/bin/env python3
"""Tiny GGUF base models and their references from transformers' own GGUF loader.

For each name on the command line (default: qwen2 qwen3 llama-spm), writes

  tests/fixtures/gguf/<name>.gguf                  a model fixture converted as llama.cpp's
                                                   convert_hf_to_gguf.py does for that
                                                   architecture: llama.cpp tensor names (from the
                                                   `gguf` package's name map), Q8_0 linear weights
                                                   and embeddings, f32 norms and biases, the
                                                   byte-level BPE vocabulary, merges, token types,
                                                   special ids and chat template as metadata
  tests/fixtures/gguf/<name>.reference.safetensors logits and greedy tokens of transformers'
                                                   GGUF loader (which dequantizes to f32 and
                                                   converts the tokenizer metadata itself)
  tests/fixtures/gguf/<name>.reference.json        token ids of sample texts and the chat-template
                                                   rendering, from the same loader

qwen2 and qwen3 are those fixtures with their byte-level BPE vocabularies ("gpt2"). phi3 is the phi3
fixture as llama.cpp writes Phi-3 files (fused `attn_qkv` and `ffn_up`, LongRoPE as
`rope_factors_long`/`rope_factors_short` tensors and `rope.scaling.*` metadata, the sliding
window), in f32 and with the SentencePiece vocabulary below: transformers' GGUF loader drops
LongRoPE, so its logits reference is the safetensors fixture's (transformers on the same
weights), and only the tokenizer and chat template come from the GGUF loader. llama-spm is
the mistral fixture's weights as llama.cpp writes a Mistral or Llama 2 file: architecture
`llama` (query and key rows permuted for llama.cpp's interleaved rotation, no sliding window)
with a SentencePiece-style vocabulary ("llama": pieces with `\u2581` for spaces, `<0xHH>` byte
tokens, scores instead of merges), trained here on the fixtures' corpus.

Needs scripts/requirements-fixtures.txt (gguf included); run after make_fixtures.py.

    python scripts/make_gguf_fixtures.py [qwen2 qwen3 llama-spm]
"""
import json
import math
import os
import shutil
import sys
import tempfile

import gguf
import numpy as np
import torch
from safetensors.torch import load_file, save_file

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = os.path.join(REPO_ROOT, "tests", "fixtures", "models")
OUT = os.path.join(REPO_ROOT, "tests", "fixtures", "gguf")

# name: (model fixture, llama.cpp architecture, byte-level pre-tokenizer or None for SentencePiece)
FIXTURES = {
    "qwen2": ("qwen2", gguf.MODEL_ARCH.QWEN2, "qwen2"),
    "qwen3": ("qwen3", gguf.MODEL_ARCH.QWEN3, "qwen2"),
    "llama-spm": ("mistral", gguf.MODEL_ARCH.LLAMA, None),
    "phi3": ("phi3", gguf.MODEL_ARCH.PHI3, None),
    # Mixture of experts: stacked expert tensors (ffn_*_exps), the router (ffn_gate_inp), and
    # Qwen2-MoE's shared expert (ffn_*_shexp, ffn_gate_inp_shexp). Mixtral is a llama file with
    # experts, in f32 (transformers' GGUF loader has no Mixtral: its logits reference is the
    # safetensors fixture's). The qwen3_moe fixture has a dense layer, which llama.cpp's qwen3moe
    # cannot describe: its GGUF is made from an all-sparse sibling (`sparse_qwen3_moe`).
    "qwen2_moe": ("qwen2_moe", gguf.MODEL_ARCH.QWEN2MOE, "qwen2"),
    "qwen3_moe": ("qwen3_moe", gguf.MODEL_ARCH.QWEN3MOE, "qwen2"),
    # Gemma as llama.cpp writes it: norms stored as 1 + w, soft-caps and window in the metadata,
    # Gemma 3's global RoPE scaling; the synthetic SentencePiece vocabulary. llama.cpp has no key for
    # `query_pre_attn_scalar` (it uses head_dim, or hidden/heads for the 27B models), so these files
    # describe the fixtures' weights with a scalar of head_dim (16, not the fixtures' 24), and with the
    # head tied to the embeddings (Gemma files have no output tensor; the fixtures are untied).
    "gemma2": ("gemma2", gguf.MODEL_ARCH.GEMMA2, None),
    "gemma3": ("gemma3", gguf.MODEL_ARCH.GEMMA3, None),
    "mixtral": ("mixtral", gguf.MODEL_ARCH.LLAMA, None),
    # Llama 3.1's RoPE scaling as llama.cpp stores it: a `rope_freqs` tensor of per-frequency
    # divisors. f32, with the synthetic SentencePiece vocabulary; transformers' GGUF loader ignores
    # `rope_freqs`, so the logits reference is the safetensors fixture's.
    "llama3": ("llama3", gguf.MODEL_ARCH.LLAMA, None),
}
# Mistral-Instruct's template shape: turns in [INST] ... [/INST], BOS once, EOS after answers.
SPM_TEMPLATE = (
    "{{- bos_token }}{%- for message in messages %}"
    "{%- if message['role'] == 'user' %}{{- '[INST] ' + message['content'] + ' [/INST]' }}"
    "{%- elif message['role'] == 'assistant' %}{{- message['content'] + eos_token }}{%- endif %}"
    "{%- endfor %}"
)
# Phi-3's: '<|role|>' turns closed by '<|end|>', here spelled in plain text (the SentencePiece
# vocabulary has no such tokens).
PHI3_TEMPLATE = (
    "{%- for message in messages %}{{- '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|assistant|>\\n' }}{%- endif %}"
)
SPACE = "\u2581"
SAMPLES = [
    "Hello world",
    "  two leading spaces, trailing space ",
    "héllo wörld — naïve café 日本 😀",
    "<|im_start|>user\nhi<|im_end|>",
    "line one\nline two\ttab 12345 3.14159",
    "the cat and the dog run fast",
    "Café über naïve año: 😀 unseen ǅ bytes",
    " a",
]
MESSAGES = [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4."},
            {"role": "user", "content": "And 3 + 3?"}]
NEW_TOKENS = 8


def tokenizer_metadata(model_dir):
    with open(os.path.join(model_dir, "tokenizer.json")) as f:
        tok = json.load(f)
    with open(os.path.join(model_dir, "tokenizer_config.json")) as f:
        tok_config = json.load(f)
    vocab = dict(tok["model"]["vocab"])
    for added in tok["added_tokens"]:
        vocab[added["content"]] = added["id"]
    tokens = [None] * len(vocab)
    for text, i in vocab.items():
        tokens[i] = text
    assert all(t is not None for t in tokens), "token ids are not contiguous"
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    special = {a["id"] for a in tok["added_tokens"] if a["special"]}
    types = [gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL for i in range(len(tokens))]
    template = tok_config.get("chat_template")
    if template is None:
        with open(os.path.join(model_dir, "chat_template.jinja")) as f:
            template = f.read()
    return tokens, merges, types, template


def sentencepiece_vocabulary(size):
    """A SentencePiece-style BPE vocabulary of exactly `size` pieces, as llama.cpp stores Llama 2's:
    <unk> <s> </s>, the 256 byte tokens <0x00>..<0xFF>, then pieces in the order BPE learned them,
    each scored minus its id (earlier merges rank higher), with token types unknown (2), control
    (3), byte (6) and normal (1)."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from make_fixtures import build_corpus
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SPACE, prepend_scheme="first", split=True)
    trainer = trainers.BpeTrainer(vocab_size=size, special_tokens=specials, show_progress=False,
                                  limit_alphabet=120)
    tok.train_from_iterator(build_corpus(), trainer)
    vocab = tok.get_vocab(with_added_tokens=True)
    assert len(vocab) == size, f"trained {len(vocab)} pieces, not {size}"
    tokens = sorted(vocab, key=vocab.get)
    types = [gguf.TokenType.UNKNOWN if i == 0 else gguf.TokenType.CONTROL if i < 3
             else gguf.TokenType.BYTE if i < 259 else gguf.TokenType.NORMAL for i in range(size)]
    scores = [0.0 if i < 259 else -float(i) for i in range(size)]
    return tokens, scores, types


def llama_permute(weights, heads):
    """llama.cpp's `LlamaModel.permute`: each head's rows reordered for interleaved rotation."""
    return weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:]).swapaxes(1, 2).reshape(
        weights.shape)


SPARSE_QWEN3_MOE_SEED = 1200


def sparse_qwen3_moe():
    """The qwen3_moe fixture's configuration with every layer sparse (seed 1200, routers redrawn
    with std 0.5 as in make_fixtures.py), its tokenizer, in a temporary directory."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM
    source = os.path.join(MODELS, "qwen3_moe")
    out = os.path.join(tempfile.gettempdir(), "ferrotune-gguf-qwen3_moe")
    shutil.rmtree(out, ignore_errors=True)
    config = Qwen3MoeConfig.from_pretrained(source)
    config.mlp_only_layers = []
    torch.manual_seed(SPARSE_QWEN3_MOE_SEED)
    model = Qwen3MoeForCausalLM(config).to(torch.float32)
    gen = torch.Generator().manual_seed(SPARSE_QWEN3_MOE_SEED + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                p.copy_(0.5 * torch.randn(p.shape, generator=gen))
            elif name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
    model.save_pretrained(out)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(source, f), out)
    return out


def source_dir(name):
    return sparse_qwen3_moe() if name == "qwen3_moe" else os.path.join(MODELS, FIXTURES[name][0])


def write_gguf(name, path, model_dir):
    source, arch, pre = FIXTURES[name]
    with open(os.path.join(model_dir, "config.json")) as f:
        config = json.load(f)
    weights = load_file(os.path.join(model_dir, "model.safetensors"))
    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[arch])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    # Gemma 3 keeps one RoPE per layer type; the file's base is the global layers'.
    rope = config["rope_parameters"]
    writer.add_rope_freq_base(rope.get("full_attention", rope)["rope_theta"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    quantize = arch != gguf.MODEL_ARCH.PHI3 and name not in ("mixtral", "llama3")
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0 if quantize else gguf.LlamaFileType.ALL_F32)
    if arch == gguf.MODEL_ARCH.PHI3:
        rope = config["rope_parameters"]
        original = rope["original_max_position_embeddings"]
        factor = config["max_position_embeddings"] / original
        writer.add_rope_dimension_count(config["head_dim"])
        writer.add_sliding_window(config["sliding_window"] or 0)
        writer.add_rope_scaling_orig_ctx_len(original)
        # llama.cpp's converter: the attention factor LongRoPE's paper suggests.
        writer.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(factor) / math.log(original)))
        writer.add_tensor("rope_factors_long.weight", np.array(rope["long_factor"], dtype=np.float32))
        writer.add_tensor("rope_factors_short.weight", np.array(rope["short_factor"], dtype=np.float32))
    elif arch == gguf.MODEL_ARCH.LLAMA:
        writer.add_rope_dimension_count(config["head_dim"])
        if config["rope_parameters"].get("rope_type") == "llama3":
            writer.add_tensor("rope_freqs.weight", llama3_rope_factors(config))
    else:
        writer.add_key_length(config["head_dim"])
        writer.add_value_length(config["head_dim"])
    if arch == gguf.MODEL_ARCH.QWEN3MOE:
        writer.add_expert_weights_norm(True)
    gemma = arch in (gguf.MODEL_ARCH.GEMMA2, gguf.MODEL_ARCH.GEMMA3)
    if gemma:
        writer.add_sliding_window(config["sliding_window"])
    if arch == gguf.MODEL_ARCH.GEMMA2:
        writer.add_attn_logit_softcapping(config["attn_logit_softcapping"])
        writer.add_final_logit_softcapping(config["final_logit_softcapping"])
    if arch == gguf.MODEL_ARCH.GEMMA3:
        full = config["rope_parameters"]["full_attention"]
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(full["factor"])

    experts = config.get("num_local_experts") or config.get("num_experts")
    if experts:
        writer.add_expert_count(experts)
        writer.add_expert_used_count(config["num_experts_per_tok"])
        if "moe_intermediate_size" in config:
            writer.add_expert_feed_forward_length(config["moe_intermediate_size"])
        if "shared_expert_intermediate_size" in config:
            writer.add_expert_shared_feed_forward_length(config["shared_expert_intermediate_size"])
        weights = stack_experts(weights, config, experts)

    if pre is not None:
        tokens, merges, types, template = tokenizer_metadata(model_dir)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre)
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        writer.add_token_merges(merges)
        writer.add_bos_token_id(config["bos_token_id"])
        writer.add_eos_token_id(config["eos_token_id"])
        writer.add_pad_token_id(config["pad_token_id"])
        writer.add_add_bos_token(False)
        writer.add_chat_template(template)
    else:
        tokens, scores, types = sentencepiece_vocabulary(config["vocab_size"])
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        writer.add_unk_token_id(0)
        writer.add_bos_token_id(1)
        writer.add_eos_token_id(2)
        writer.add_add_bos_token(arch != gguf.MODEL_ARCH.PHI3)
        if gemma:
            writer.add_add_space_prefix(False)
        writer.add_add_eos_token(False)
        writer.add_chat_template(PHI3_TEMPLATE if arch == gguf.MODEL_ARCH.PHI3 else SPM_TEMPLATE)

    names = gguf.get_tensor_name_map(arch, config["num_hidden_layers"])
    if arch in (gguf.MODEL_ARCH.GEMMA2, gguf.MODEL_ARCH.GEMMA3):
        weights.pop("lm_head.weight", None)  # llama.cpp's Gemma has no output tensor: the head is tied
    for hf_name in sorted(weights):
        tensor = weights[hf_name].to(torch.float32).numpy()
        if arch == gguf.MODEL_ARCH.LLAMA and hf_name.endswith("q_proj.weight"):
            tensor = llama_permute(tensor, config["num_attention_heads"])
        elif arch == gguf.MODEL_ARCH.LLAMA and hf_name.endswith("k_proj.weight"):
            tensor = llama_permute(tensor, config["num_key_value_heads"])
        if gemma and hf_name.endswith("norm.weight"):
            tensor = tensor + 1.0  # llama.cpp's converter stores Gemma's (1 + w) norms with the 1 added
        if hf_name.endswith("shared_expert_gate.weight"):
            tensor = tensor.reshape(-1)  # llama.cpp stores the shared expert's gate as a vector
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        assert gguf_name is not None, f"no GGUF name for {hf_name}"
        # Like llama.cpp's Q8_0 files: 2-D and stacked expert weights quantized; norms, biases and
        # the routers kept in f32.
        router = hf_name.endswith("mlp.gate.weight") or hf_name.endswith("shared_expert_gate.weight")
        if quantize and tensor.ndim >= 2 and not hf_name.endswith("norm.weight") and not router:
            data = gguf.quants.quantize(tensor, gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(gguf_name, data, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(gguf_name, np.ascontiguousarray(tensor))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def llama3_rope_factors(config):
    """The per-frequency divisors llama.cpp's converter writes for Llama 3.1's RoPE scaling: 1 for
    short wavelengths, `factor` for long ones, and between them the inverse of the smoothed
    interpolation `(1 - s) / factor + s`."""
    rope = config["rope_parameters"]
    dim, base = config["head_dim"], rope["rope_theta"]
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    original = rope["original_max_position_embeddings"]
    low_wavelen, high_wavelen = original / low, original / high
    out = []
    for i in range(0, dim, 2):
        wavelen = 2 * math.pi * base ** (i / dim)
        if wavelen < high_wavelen:
            out.append(1.0)
        elif wavelen > low_wavelen:
            out.append(factor)
        else:
            smooth = (original / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def stack_experts(weights, config, experts):
    """Per-expert checkpoint weights stacked `(E, out, in)` under the names llama.cpp's converter
    maps to `ffn_{gate,up,down}_exps` (`mlp.experts.gate_proj`, `block_sparse_moe.experts.w1`)."""
    out = dict(weights)
    for layer in range(config["num_hidden_layers"]):
        for prefix, parts in ((f"model.layers.{layer}.block_sparse_moe.experts", ("w1", "w2", "w3")),
                              (f"model.layers.{layer}.mlp.experts", ("gate_proj", "up_proj", "down_proj"))):
            for part in parts:
                names = [f"{prefix}.{e}.{part}.weight" for e in range(experts)]
                if all(n in out for n in names):
                    out[f"{prefix}.{part}.weight"] = torch.stack([out.pop(n) for n in names])
    return out


def references(name, path, model_dir):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    folder, file = os.path.split(path)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=file)
    # transformers' GGUF config mapping skips `attention.key_length`, so Qwen3's head_dim would
    # be Qwen3Config's default (128); it is set from the file's own metadata.
    config = AutoConfig.from_pretrained(folder, gguf_file=file)
    reader = gguf.GGUFReader(path)
    arch_name = gguf.MODEL_ARCH_NAMES[FIXTURES[name][1]]

    def number(key):
        field = reader.fields.get(f"{arch_name}.{key}")
        return None if field is None else int(field.parts[field.data[0]][0])

    if number("attention.key_length") is not None:
        config.head_dim = number("attention.key_length")
    # Nor does it map Qwen2-MoE's expert sizes (the config's defaults would not fit the file).
    if number("expert_feed_forward_length") is not None:
        config.moe_intermediate_size = number("expert_feed_forward_length")
    if number("expert_shared_feed_forward_length") is not None:
        config.shared_expert_intermediate_size = number("expert_shared_feed_forward_length")
    # Gemma: nor the soft-caps, window, query scale (llama.cpp: head_dim below 27B), RoPE scaling or
    # an untied head; set as llama.cpp reads the file.
    if FIXTURES[name][1] in (gguf.MODEL_ARCH.GEMMA2, gguf.MODEL_ARCH.GEMMA3):
        def real(key):
            field = reader.fields.get(f"{arch_name}.{key}")
            return None if field is None else float(field.parts[field.data[0]][0])
        config.query_pre_attn_scalar = config.head_dim
        config.sliding_window = number("attention.sliding_window")
        config.tie_word_embeddings = "output.weight" not in [t.name for t in reader.tensors]
        if FIXTURES[name][1] == gguf.MODEL_ARCH.GEMMA2:
            config.attn_logit_softcapping = real("attn_logit_softcapping")
            config.final_logit_softcapping = real("final_logit_softcapping")
        else:
            config.rope_parameters = {
                "full_attention": {"rope_type": "linear", "factor": real("rope.scaling.factor"),
                                   "rope_theta": real("rope.freq_base")},
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}
    source = FIXTURES[name][0]
    fixture = load_file(os.path.join(MODELS, source, "reference.safetensors"))
    input_ids = fixture["input_ids"]
    rendered = tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    prompt = tok.encode(rendered, add_special_tokens=False)
    stem = os.path.join(OUT, name)
    document = {
        "samples": SAMPLES,
        "encodings": [tok.encode(s, add_special_tokens=False) for s in SAMPLES],
        "with_special_tokens": [tok.encode(s) for s in SAMPLES],
        "decoded": [tok.decode(tok.encode(s, add_special_tokens=False)) for s in SAMPLES],
        "messages": MESSAGES,
        "rendered": rendered,
        "prompt_ids": prompt,
    }
    with open(stem + ".reference.json", "w", encoding="utf-8") as f:
        json.dump(document, f, indent=1, ensure_ascii=False)
        f.write("\n")
    if FIXTURES[name][1] == gguf.MODEL_ARCH.PHI3 or name in ("mixtral", "llama3"):
        save_file({"input_ids": input_ids, "logits": fixture["logits"]}, stem + ".reference.safetensors")
        print(f"{name}: {os.path.getsize(path)} bytes; logits reference from the safetensors fixture")
        return
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, config=config, dtype=torch.float32)
    model = model.eval()
    with torch.no_grad():
        logits = model(input_ids=input_ids).logits
        greedy = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None,
                                pad_token_id=None)[0, len(prompt):]
    save_file({"input_ids": input_ids, "logits": logits.contiguous(), "greedy_ids": greedy.contiguous()},
              stem + ".reference.safetensors")
    # Without the sliding window, which a llama-architecture file does not carry.
    window = {"sliding_window": None} if FIXTURES[name][1] == gguf.MODEL_ARCH.LLAMA else {}
    original = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                    **window).eval()
    with torch.no_grad():
        drift = (original(input_ids=input_ids).logits - logits).abs().max().item()
    print(f"{name}: {os.path.getsize(path)} bytes; greedy {greedy.tolist()}; "
          f"Q8_0 vs the f32 fixture logits max |diff| {drift:.3e}")


def main(names):
    os.makedirs(OUT, exist_ok=True)
    torch.manual_seed(0)
    for name in names:
        path = os.path.join(OUT, f"{name}.gguf")
        model_dir = source_dir(name)
        with tempfile.TemporaryDirectory() as tmp:
            staged = os.path.join(tmp, f"{name}.gguf")
            write_gguf(name, staged, model_dir)
            os.replace(staged, path)
        references(name, path, model_dir)


if __name__ == "__main__":
    main(sys.argv[1:] or list(FIXTURES))
