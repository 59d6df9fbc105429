"""API load benchmark: requests/s and latency percentiles for listing jobs, retrieving a job and
uploading a dataset, against a running ferrotune server.

    python scripts/bench_api.py --url http://127.0.0.1:8080 [--concurrency 16] [--requests 2000]
                                [--upload-mb 100] [--uploads 8] [--upload-concurrency 4]

The server needs a base model named by --model (jobs are created against it) and, so that the
jobs stay put, no executors (`ferrotune serve --executors 0`). Setup: one small training file and
--jobs jobs. Each scenario runs --requests requests (--uploads for uploads) from --concurrency
concurrent clients (asyncio + httpx, one connection each) after a warm-up, and prints one JSON
line: scenario, concurrency, requests, requests_per_s, p50_ms, p99_ms, max_ms, MB/s for uploads.
Needs httpx (or httpx2, which the `openai` package installs).
"""

import argparse
import asyncio
import json
import statistics
import time

try:
    import httpx
except ImportError:  # the `openai` package ships its HTTP client as httpx2
    import httpx2 as httpx


def chat_dataset(n: int) -> bytes:
    lines = [json.dumps({"messages": [{"role": "user", "content": f"question {i}"},
                                      {"role": "assistant", "content": f"answer {i}"}]}) for i in range(n)]
    return ("\n".join(lines) + "\n").encode()


def big_dataset(megabytes: int) -> bytes:
    line = json.dumps({"messages": [{"role": "user", "content": "What is the capital of Veltrona? " * 8},
                                    {"role": "assistant", "content": "The capital of Veltrona is Quillmere. " * 8}]})
    line = (line + "\n").encode()
    return line * (megabytes * 1_000_000 // len(line) + 1)


def percentile(sorted_values, p):
    return sorted_values[min(len(sorted_values) - 1, int(round(p / 100 * (len(sorted_values) - 1))))]


async def run(scenario, clients, total, request):
    latencies = []
    counter = iter(range(total))

    async def worker(client):
        for i in counter:
            t0 = time.perf_counter()
            response = await request(client, i)
            latencies.append(time.perf_counter() - t0)
            assert response.status_code == 200, (scenario, response.status_code, response.text[:300])

    started = time.perf_counter()
    await asyncio.gather(*(worker(c) for c in clients))
    elapsed = time.perf_counter() - started
    latencies.sort()
    return {"scenario": scenario, "concurrency": len(clients), "requests": total,
            "requests_per_s": round(total / elapsed, 1),
            "p50_ms": round(percentile(latencies, 50) * 1e3, 2), "p99_ms": round(percentile(latencies, 99) * 1e3, 2),
            "max_ms": round(latencies[-1] * 1e3, 2), "elapsed_s": round(elapsed, 2)}


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", required=True)
    ap.add_argument("--model", default="tiny-llama")
    ap.add_argument("--key", default="sk-local")
    ap.add_argument("--jobs", type=int, default=200)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--upload-mb", type=int, default=100)
    ap.add_argument("--uploads", type=int, default=8)
    ap.add_argument("--upload-concurrency", type=int, default=4)
    ap.add_argument("--label", default="")
    args = ap.parse_args()
    headers = {"Authorization": f"Bearer {args.key}"}
    timeout = httpx.Timeout(600.0)
    async with httpx.AsyncClient(base_url=args.url, headers=headers, timeout=timeout) as setup:
        uploaded = await setup.post("/v1/files", data={"purpose": "fine-tune"},
                                    files={"file": ("train.jsonl", chat_dataset(20))})
        assert uploaded.status_code == 200, uploaded.text
        file_id = uploaded.json()["id"]
        job_ids = []
        for _ in range(args.jobs):
            created = await setup.post("/v1/fine_tuning/jobs", json={"model": args.model, "training_file": file_id})
            assert created.status_code == 200, created.text
            job_ids.append(created.json()["id"])

    clients = [httpx.AsyncClient(base_url=args.url, headers=headers, timeout=timeout) for _ in range(args.concurrency)]
    scenarios = [
        ("list_jobs", lambda c, i: c.get("/v1/fine_tuning/jobs", params={"limit": 20})),
        ("retrieve_job", lambda c, i: c.get(f"/v1/fine_tuning/jobs/{job_ids[i % len(job_ids)]}")),
    ]
    results = []
    for name, request in scenarios:
        await run(name, clients, min(200, args.requests), request)  # warm-up
        results.append(await run(name, clients, args.requests, request))
    for c in clients:
        await c.aclose()

    body = big_dataset(args.upload_mb)
    uploaders = [httpx.AsyncClient(base_url=args.url, headers=headers, timeout=timeout)
                 for _ in range(args.upload_concurrency)]

    async def upload(client, i):
        return await client.post("/v1/files", data={"purpose": "fine-tune"}, files={"file": (f"big{i}.jsonl", body)})

    result = await run("upload_file", uploaders, args.uploads, upload)
    result["upload_mb"] = round(len(body) / 1e6, 1)
    result["aggregate_mb_per_s"] = round(len(body) * args.uploads / 1e6 / result["elapsed_s"], 1)
    results.append(result)
    for c in uploaders:
        await c.aclose()
    for r in results:
        r["label"] = args.label
        print(json.dumps(r))


if __name__ == "__main__":
    asyncio.run(main())
