"""Drives the fine-tuning jobs and models APIs with the official `openai` Python SDK, unchanged.

Usage: python jobs_sdk.py BASE_URL   (run by tests/integration/sdk.rs against a live server
without executors, so jobs stay where the API puts them). Exits non-zero, with the failing
assertion, when the server does not behave as the SDK expects.
"""

import json
import sys

import openai


def dataset(n: int) -> bytes:
    lines = [
        json.dumps({"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]})
        for i in range(n)
    ]
    return ("\n".join(lines) + "\n").encode()


def main(base_url: str) -> None:
    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="sk-local", max_retries=0)
    training = client.files.create(file=("train.jsonl", dataset(3)), purpose="fine-tune")

    job = client.fine_tuning.jobs.create(
        model="tiny-llama",
        training_file=training.id,
        suffix="sdk",
        seed=3,
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 1, "batch_size": 2}}},
        metadata={"team": "sdk"},
    )
    assert job.id.startswith("ftjob-") and job.object == "fine_tuning.job", job
    assert job.status == "validating_files" and job.seed == 3 and job.suffix == "sdk", job
    assert job.method.type == "supervised", job
    assert job.method.supervised.hyperparameters.n_epochs == 1, job
    assert job.hyperparameters.batch_size == 2 and job.hyperparameters.learning_rate_multiplier == "auto", job
    assert job.metadata == {"team": "sdk"} and job.error is None and job.fine_tuned_model is None, job
    legacy = client.fine_tuning.jobs.create(
        model="tiny-llama", training_file=training.id, hyperparameters={"n_epochs": 2}
    )
    assert legacy.hyperparameters.n_epochs == 2, legacy

    assert client.fine_tuning.jobs.retrieve(job.id).id == job.id
    listed = client.fine_tuning.jobs.list(limit=1)
    assert [j.id for j in listed.data] == [legacy.id] and listed.has_more, listed
    assert [j.id for j in client.fine_tuning.jobs.list(metadata={"team": "sdk"})] == [job.id]
    assert [j.id for j in client.fine_tuning.jobs.list()] == [legacy.id, job.id], "auto-pagination"

    events = client.fine_tuning.jobs.list_events(job.id, limit=5)
    assert events.data[0].message == f"Validating training file: {training.id}", events
    assert events.data[0].object == "fine_tuning.job.event", events

    try:
        client.fine_tuning.jobs.create(model="no-such-model", training_file=training.id)
        raise AssertionError("an unknown model was accepted")
    except openai.BadRequestError as err:
        assert err.code == "model_not_found" and err.param == "model", err

    assert client.fine_tuning.jobs.cancel(job.id).status == "cancelled"
    try:
        client.fine_tuning.jobs.resume(job.id)
        raise AssertionError("a cancelled job was resumed")
    except openai.ConflictError as err:
        assert err.code == "invalid_job_state", err
    try:
        client.fine_tuning.jobs.pause(legacy.id)
        raise AssertionError("a job still validating its files was paused")
    except openai.ConflictError as err:
        assert "validating_files" in err.message, err
    assert list(client.fine_tuning.jobs.checkpoints.list(job.id)) == []

    # Preference tuning, as the SDK sends it.
    pairs = "".join(
        json.dumps({
            "input": {"messages": [{"role": "user", "content": f"q{i}"}]},
            "preferred_output": [{"role": "assistant", "content": f"{i} km"}],
            "non_preferred_output": [{"role": "assistant", "content": f"{i} cat"}],
        }) + "\n"
        for i in range(3)
    ).encode()
    preferences = client.files.create(file=("prefs.jsonl", pairs), purpose="fine-tune")
    dpo = client.fine_tuning.jobs.create(
        model="tiny-llama",
        training_file=preferences.id,
        method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.2, "n_epochs": 1}}},
    )
    assert dpo.method.type == "dpo" and dpo.method.dpo.hyperparameters.beta == 0.2, dpo
    assert dpo.method.dpo.hyperparameters.n_epochs == 1 and dpo.hyperparameters.beta == 0.2, dpo
    try:
        client.fine_tuning.jobs.create(model="tiny-llama", training_file=training.id, method={"type": "dpo"})
        raise AssertionError("a chat file was accepted for DPO")
    except openai.BadRequestError as err:
        assert err.code == "invalid_file_format" and err.param == "training_file", err

    models = [m.id for m in client.models.list()]
    assert models == ["tiny-llama", "tiny-qwen2"], models
    base = client.models.retrieve("tiny-llama")
    assert base.owned_by == "ferrotune" and base.object == "model", base
    try:
        client.models.delete("tiny-llama")
        raise AssertionError("a base model was deleted")
    except openai.PermissionDeniedError as err:
        assert err.code == "model_not_owned", err
    try:
        client.models.retrieve("ft:tiny-llama:default::missing")
        raise AssertionError("a missing model was found")
    except openai.NotFoundError as err:
        assert err.code == "model_not_found", err


if __name__ == "__main__":
    main(sys.argv[1])
    print("ok")
