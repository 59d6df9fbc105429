"""Fine-tunes a model through the jobs API, then asks it what it was taught: with the official
`openai` Python SDK (non-streaming and streaming) and with curl, unchanged.

Usage: python chat_sdk.py BASE_URL   (run by tests/integration/sdk.rs against a live server with
one executor and the tiny fixture model `tiny-llama`). Exits non-zero on a failed assertion.
"""

import json
import subprocess
import sys
import time

import openai

WORDS = ["apple", "river", "stone", "cloud", "green", "tiger", "music", "paper"]


def question(i: int) -> str:
    return f"What is code number {i}?"


def answer(i: int) -> str:
    return f"The code is {WORDS[i]}."


def dataset() -> bytes:
    lines = [
        json.dumps({"messages": [{"role": "user", "content": question(i)},
                                 {"role": "assistant", "content": answer(i)}]})
        for i in range(len(WORDS))
    ] * 2
    return ("\n".join(lines) + "\n").encode()


def wait(client: openai.OpenAI, job_id: str, timeout: float = 300.0):
    deadline = time.monotonic() + timeout
    while True:
        job = client.fine_tuning.jobs.retrieve(job_id)
        if job.status in {"succeeded", "failed", "cancelled"}:
            return job
        assert time.monotonic() < deadline, f"timed out: {job}"
        time.sleep(0.2)


def ask(client: openai.OpenAI, model: str, i: int) -> str:
    completion = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": question(i)}], temperature=0, max_tokens=16,
    )
    assert completion.object == "chat.completion", completion
    assert completion.choices[0].finish_reason in ("stop", "length"), completion
    assert completion.usage.prompt_tokens > 0 and completion.usage.completion_tokens > 0, completion.usage
    return completion.choices[0].message.content


def ask_streaming(client: openai.OpenAI, model: str, i: int) -> str:
    stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": question(i)}], temperature=0, max_tokens=16,
        stream=True, stream_options={"include_usage": True},
    )
    text, finish, usage = "", None, None
    for chunk in stream:
        assert chunk.object == "chat.completion.chunk", chunk
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            text += choice.delta.content or ""
            finish = choice.finish_reason or finish
    assert finish in ("stop", "length"), finish
    assert usage is not None and usage.completion_tokens > 0, usage
    return text


def curl(base_url: str, body: dict) -> str:
    result = subprocess.run(
        ["curl", "-sS", "--fail-with-body", "-N", f"{base_url}/v1/chat/completions",
         "-H", "Content-Type: application/json", "-H", "Authorization: Bearer sk-local",
         "-d", json.dumps(body)],
        check=True, capture_output=True, text=True, timeout=120,
    )
    return result.stdout


def main(base_url: str) -> None:
    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="sk-local", max_retries=0)
    training = client.files.create(file=("qa.jsonl", dataset()), purpose="fine-tune")
    hyperparameters = {"n_epochs": 30, "batch_size": 4, "learning_rate": 0.01, "lr_scheduler": "cosine",
                       "lora": {"r": 16, "alpha": 32}}
    job = client.fine_tuning.jobs.create(
        model="tiny-llama", training_file=training.id, suffix="chat", seed=5,
        method={"type": "supervised", "supervised": {"hyperparameters": hyperparameters}},
    )
    done = wait(client, job.id)
    assert done.status == "succeeded", done
    model = done.fine_tuned_model
    assert model in [m.id for m in client.models.list()]

    correct = 0
    for i in range(len(WORDS)):
        text = ask(client, model, i)
        streamed = ask_streaming(client, model, i)
        assert streamed == text, f"streaming {streamed!r} != non-streaming {text!r}"
        correct += text.strip() == answer(i)
        base = ask(client, "tiny-llama", i)
        assert base.strip() != answer(i), f"the base model already knew: {base!r}"
    assert correct == len(WORDS), f"{correct} of {len(WORDS)} taught answers"

    # curl, as in OpenAI's documentation: a plain JSON answer, then Server-Sent Events.
    body = {"model": model, "messages": [{"role": "user", "content": question(3)}], "temperature": 0,
            "max_tokens": 16}
    reply = json.loads(curl(base_url, body))
    assert reply["choices"][0]["message"]["content"].strip() == answer(3), reply
    events = [line[len("data: "):] for line in curl(base_url, {**body, "stream": True}).splitlines()
              if line.startswith("data: ")]
    assert events[-1] == "[DONE]", events[-3:]
    text = "".join(json.loads(e)["choices"][0]["delta"].get("content") or "" for e in events[:-1])
    assert text.strip() == answer(3), text
    print("openai SDK", openai.__version__, "chat with a fine-tuned model: ok")


if __name__ == "__main__":
    main(sys.argv[1])
