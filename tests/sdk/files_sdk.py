"""Drives the Files API with the official `openai` Python SDK, unchanged.

Usage: python files_sdk.py BASE_URL   (run by tests/api/sdk.rs against a live server)
Exits non-zero, with the failing assertion, when the server does not behave as the SDK expects.
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
    content = dataset(3)

    created = [client.files.create(file=(f"train{i}.jsonl", content), purpose="fine-tune") for i in range(3)]
    first = created[0]
    assert first.id.startswith("file-"), first
    assert first.status == "processed" and first.purpose == "fine-tune", first
    assert first.bytes == len(content) and first.filename == "train0.jsonl", first
    assert first.model_extra.get("format") == "chat" and first.model_extra.get("examples") == 3, first

    page = client.files.list(limit=1)
    assert len(page.data) == 1 and page.has_more, page
    all_ids = [f.id for f in client.files.list(limit=1)]  # the SDK follows `after` cursors
    assert all_ids == [f.id for f in reversed(created)], all_ids
    asc_ids = [f.id for f in client.files.list(limit=2, order="asc", purpose="fine-tune")]
    assert asc_ids == [f.id for f in created], asc_ids

    retrieved = client.files.retrieve(created[1].id)
    assert retrieved.id == created[1].id and retrieved.filename == "train1.jsonl", retrieved

    downloaded = client.files.content(created[1].id).read()
    assert downloaded == content, downloaded[:200]

    deleted = client.files.delete(created[1].id)
    assert deleted.deleted and deleted.id == created[1].id, deleted
    try:
        client.files.retrieve(created[1].id)
        raise AssertionError("a deleted file was still retrievable")
    except openai.NotFoundError as err:
        assert err.code == "file_not_found", err.body

    try:
        client.files.create(file=("bad.jsonl", b'{"messages": 1}\nnot json\n'), purpose="fine-tune")
        raise AssertionError("an invalid dataset was accepted")
    except openai.BadRequestError as err:
        assert err.code == "invalid_dataset", err.body
        lines = [p["line"] for p in err.body["problems"]]
        assert lines == [1, 2], err.body

    remaining = [f.id for f in client.files.list()]
    assert remaining == [created[2].id, created[0].id], remaining
    print("openai SDK", openai.__version__, "files API: ok")


if __name__ == "__main__":
    main(sys.argv[1])
