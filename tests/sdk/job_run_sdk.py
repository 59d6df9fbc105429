"""Follows a fine-tuning job to its model with the official `openai` Python SDK, unchanged.

Usage: python job_run_sdk.py BASE_URL   (run by tests/integration/sdk.rs against a live server
with one executor and the tiny fixture model `tiny-llama`). Exits non-zero on a failed assertion.
"""

import json
import sys
import time

import openai


def dataset(n: int) -> bytes:
    lines = [
        json.dumps({"messages": [{"role": "user", "content": f"What is code {i}?"},
                                 {"role": "assistant", "content": f"Code {i} is blue."}]})
        for i in range(n)
    ]
    return ("\n".join(lines) + "\n").encode()


def wait(client: openai.OpenAI, job_id: str, statuses: set, timeout: float = 240.0):
    deadline = time.monotonic() + timeout
    while True:
        job = client.fine_tuning.jobs.retrieve(job_id)
        if job.status in statuses:
            return job
        assert time.monotonic() < deadline, f"timed out waiting for {statuses}: {job}"
        time.sleep(0.1)


def main(base_url: str) -> None:
    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="sk-local", max_retries=0)
    training = client.files.create(file=("train.jsonl", dataset(8)), purpose="fine-tune")
    hyperparameters = {"n_epochs": 6, "batch_size": 2, "learning_rate": 0.01, "n_checkpoints": 3}
    job = client.fine_tuning.jobs.create(
        model="tiny-llama", training_file=training.id, suffix="sdk",
        method={"type": "supervised", "supervised": {"hyperparameters": hyperparameters}},
    )
    # A second job, cancelled while it waits behind the first.
    other = client.fine_tuning.jobs.create(model="tiny-llama", training_file=training.id)
    assert client.fine_tuning.jobs.cancel(other.id).status == "cancelled"

    done = wait(client, job.id, {"succeeded", "failed", "cancelled"})
    assert done.status == "succeeded", done
    assert done.fine_tuned_model and done.fine_tuned_model.startswith("ft:tiny-llama:default:sdk:"), done
    assert done.trained_tokens and done.trained_tokens > 0, done
    assert done.hyperparameters.n_epochs == 6 and done.hyperparameters.batch_size == 2, done

    events = list(client.fine_tuning.jobs.list_events(job.id, limit=7))  # follows `after` cursors
    messages = [e.message for e in events]
    assert messages[0] == "The job has successfully completed", messages[:3]
    assert messages[-1] == f"Validating training file: {training.id}", messages[-3:]
    steps = sorted(e.data["step"] for e in events if e.type == "metrics" and "train_loss" in (e.data or {}))
    assert steps == list(range(1, 25)), steps

    checkpoints = list(client.fine_tuning.jobs.checkpoints.list(job.id))
    assert [c.step_number for c in checkpoints] == [16, 8], checkpoints
    assert checkpoints[0].fine_tuned_model_checkpoint == f"{done.fine_tuned_model}:ckpt-step-16", checkpoints[0]
    assert checkpoints[0].metrics.train_loss is not None, checkpoints[0]

    results = client.files.content(done.result_files[0]).read().decode()
    assert results.splitlines()[0] == "step,train_loss,train_accuracy,valid_loss,valid_mean_token_accuracy"

    models = [m.id for m in client.models.list()]
    assert done.fine_tuned_model in models, models
    assert client.models.retrieve(done.fine_tuned_model).parent == "tiny-llama"
    assert client.fine_tuning.jobs.retrieve(other.id).status == "cancelled"

    # Preference tuning on top of the supervised model, as the SDK sends it.
    pairs = "".join(
        json.dumps({
            "input": {"messages": [{"role": "user", "content": f"What is code {i}?"}]},
            "preferred_output": [{"role": "assistant", "content": f"Code {i} is blue."}],
            "non_preferred_output": [{"role": "assistant", "content": f"Code {i} is red."}],
        }) + "\n"
        for i in range(4)
    ).encode()
    preferences = client.files.create(file=("prefs.jsonl", pairs), purpose="fine-tune")
    dpo = client.fine_tuning.jobs.create(
        model=done.fine_tuned_model, training_file=preferences.id, suffix="dpo",
        method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.1, "n_epochs": 1, "batch_size": 2}}},
    )
    assert dpo.model == done.fine_tuned_model, dpo
    dpo_done = wait(client, dpo.id, {"succeeded", "failed", "cancelled"})
    assert dpo_done.status == "succeeded", dpo_done
    assert dpo_done.fine_tuned_model.startswith("ft:tiny-llama:default:dpo:"), dpo_done
    tuned = client.models.retrieve(dpo_done.fine_tuned_model)
    assert tuned.parent == done.fine_tuned_model, tuned
    answer = client.chat.completions.create(
        model=dpo_done.fine_tuned_model, messages=[{"role": "user", "content": "What is code 2?"}], max_tokens=4
    )
    assert answer.choices[0].message.content, answer
    try:
        client.models.delete(done.fine_tuned_model)
        raise AssertionError("a model that another was trained from was deleted")
    except openai.ConflictError as err:
        assert err.code == "model_in_use", err
    print("openai SDK", openai.__version__, "job run: ok")


if __name__ == "__main__":
    main(sys.argv[1])
