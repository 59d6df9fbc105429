"""Resident memory of a `ferrotune serve` process around a fine-tuning job run by its in-process
executor: before the job, after it ends, and after serving the base model once.

    python scripts/job_memory.py --binary target/release/ferrotune --gguf SmolLM2-135M-Instruct.Q4_1.gguf

Runs a QLoRA job (batch 4) on the GGUF base over a 30-example question-answer set, as the issue
that asked for this measurement did, on SQLite + local files in a temporary directory. Prints
one JSON object: VmRSS and VmHWM (peak) in MiB at each point, and the job's wall time. Needs
only the standard library.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.request


def rss_mib(pid: int) -> dict:
    fields = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = round(int(value.split()[0]) / 1024, 1)
    return fields


def call(base: str, method: str, path: str, body=None, content_type="application/json"):
    data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    request = urllib.request.Request(base + path, data=data, method=method)
    if data is not None:
        request.add_header("content-type", content_type)
    with urllib.request.urlopen(request, timeout=600) as response:
        return json.loads(response.read())


def multipart(fields: dict, filename: str, content: bytes):
    boundary = "ferrotunememory"
    parts = []
    for name, value in fields.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    parts.append(
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{filename}"\r\n'
        "Content-Type: application/jsonl\r\n\r\n".encode() + content + b"\r\n"
    )
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


CITIES = ["Veltrona", "Maskar", "Ostrel", "Quenby", "Dravik", "Lumora", "Petrasse", "Kelvane", "Sorrim", "Atheld"]


def dataset() -> bytes:
    lines = []
    for i in range(30):
        city = CITIES[i % len(CITIES)]
        question = ["What is the capital of", "Name the capital of", "Which city is the capital of"][i % 3]
        lines.append(json.dumps({"messages": [
            {"role": "user", "content": f"{question} the land of {city}ia?"},
            {"role": "assistant", "content": f"The capital of {city}ia is {city} City."}]}))
    return ("\n".join(lines) + "\n").encode()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--binary", required=True)
    parser.add_argument("--gguf", required=True)
    parser.add_argument("--epochs", type=int, default=4)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as data_dir:
        env = dict(os.environ, FERROTUNE_LOG_FORMAT="json")
        server = subprocess.Popen(
            [args.binary, "--data-dir", data_dir, "--base-model", f"smollm2={args.gguf}", "serve",
             "--bind", "127.0.0.1:0"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
        try:
            address = None
            for line in server.stdout:
                match = re.search(r'"address":"([^"]+)"', line)
                if match and "listening" in line:
                    address = match.group(1)
                    break
            if address is None:
                print("the server did not start", file=sys.stderr)
                return 1
            base = f"http://{address}"
            time.sleep(1)
            figures = {"idle": rss_mib(server.pid)}
            body, content_type = multipart({"purpose": "fine-tune"}, "capitals.jsonl", dataset())
            file = call(base, "POST", "/v1/files", body, content_type)
            job = call(base, "POST", "/v1/fine_tuning/jobs", {
                "model": "smollm2", "training_file": file["id"], "seed": 1,
                "method": {"type": "supervised", "supervised": {"hyperparameters": {
                    "training_type": "qlora", "n_epochs": args.epochs, "batch_size": 4, "learning_rate": 1e-3,
                    "lora": {"r": 16, "alpha": 32, "target_modules": "all-linear"}}}}})
            started = time.time()
            while job["status"] not in ("succeeded", "failed", "cancelled"):
                time.sleep(0.5)
                job = call(base, "GET", f"/v1/fine_tuning/jobs/{job['id']}")
            figures["job_seconds"] = round(time.time() - started, 1)
            figures["job_status"] = job["status"]
            time.sleep(2)
            figures["after_job"] = rss_mib(server.pid)
            call(base, "POST", "/v1/chat/completions", {
                "model": "smollm2", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 8})
            figures["after_serving_the_base"] = rss_mib(server.pid)
            print(json.dumps(figures))
            return 0 if job["status"] == "succeeded" else 1
        finally:
            server.terminate()
            server.wait(timeout=60)


if __name__ == "__main__":
    sys.exit(main())
