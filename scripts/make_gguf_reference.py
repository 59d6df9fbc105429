"""Reference outputs for the GGUF base-model tests, from transformers' own GGUF support (which
dequantizes the weights and converts the tokenizer metadata independently of ferrotune).

    ~/.cache/ferrotune-perf/.venv/bin/python scripts/make_gguf_reference.py GGUF_FILE > tests/fixtures/smollm2/reference.json

Writes: token ids of sample texts (tokenizer), the chat-template rendering of a conversation, and
the last-position logits' top 20 (ids, values) for a prompt, with the dequantized model in f32.
"""

import json
import os
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

SAMPLES = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "Numbers: 1234567 and 3.14159, dates 2026-11-28.",
    "  leading spaces, trailing spaces  ",
    "Tabs\tand\nnew\n\nlines",
    "Ünïcödé: naïve café, 日本語のテキスト, emoji 🚀🔥.",
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n",
    "def f(x):\n    return x ** 2  # square",
    "I'm sure they'll say it's fine, won't they?",
    "MixedCASE words and ALLCAPS, snake_case_name, camelCaseName.",
]


def main(path: str) -> None:
    torch.manual_seed(0)
    folder, name = os.path.split(os.path.abspath(path))
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    encodings = [tok.encode(s, add_special_tokens=False) for s in SAMPLES]
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    rendered = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    prompt = tok.encode(rendered, add_special_tokens=False)
    with torch.no_grad():
        logits = model(torch.tensor([prompt])).logits[0, -1]
    top = torch.topk(logits, 20)
    greedy = model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False)[0, len(prompt):].tolist()
    json.dump({
        "samples": SAMPLES,
        "encodings": encodings,
        "messages": messages,
        "rendered": rendered,
        "prompt_ids": prompt,
        "top_ids": top.indices.tolist(),
        "top_logits": [round(v, 5) for v in top.values.tolist()],
        "greedy_ids": greedy,
    }, sys.stdout, ensure_ascii=False, indent=1)
    print()


if __name__ == "__main__":
    main(sys.argv[1])
