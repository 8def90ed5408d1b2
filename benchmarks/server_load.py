"""The images server under load on 127.0.0.1: every request answered, none lost, memory flat.

    python benchmarks/server_load.py [--workdir=PIPELINE] [--clients=12] [--rounds=3]

Starts `python -m dalle_jax.serve` on a trained pipeline workdir (default: trains
configs/pipeline_tiny.py into a temporary one first, a few minutes) and drives it, round after
round, with `--clients` concurrent clients, half through OpenAI's own client and half through
raw HTTP, each sending `--requests` requests of mixed settings: 1-4 images, two sizes, url and
base64 answers, guidance on and off, reranking. The queue is kept short (`--max_queue`) so some
requests meet a full queue.

Pass/fail: every request is answered, with 200 or with 429 in OpenAI's error shape, within
`--timeout` seconds; a 200 carries as many images as asked; the server's resident memory after
the last round is within `--memory_growth` of the first round's. Figures: requests/s, images/s
and the p50/p99 latency of answered requests, and the server's images/s over two references
measured in the same run, before the server starts: the image service drawing the first
round's requests one after another in this process (no HTTP, no concurrency: the server's
overhead, or its gain from batching requests together, as a ratio), and the generator alone
drawing full batches of one prompt (the ceiling).
"""
import argparse
import base64
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

PROMPTS = ["a red circle", "a blue square above a green triangle", "a yellow square",
           "a magenta circle left of a cyan triangle", "un cercle rouge 🎨"]


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="", help="a trained pipeline workdir")
    parser.add_argument("--clients", type=int, default=12)
    parser.add_argument("--requests", type=int, default=6, help="per client and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--max_queue", type=int, default=8)
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--memory_growth", type=float, default=0.10)
    return parser.parse_args()


def tiny_pipeline(directory: str) -> str:
    workdir = os.path.join(directory, "pipeline")
    subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--config",
                    os.path.join(ROOT, "configs", "pipeline_tiny.py"), "--workdir", workdir],
                   check=True, cwd=ROOT)
    return workdir


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(workdir: str, args) -> tuple[subprocess.Popen, str]:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "dalle_jax.serve", f"--workdir={workdir}", f"--port={port}",
         f"--batch_size={args.batch_size}", f"--max_queue={args.max_queue}"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in process.stdout:
        if line.startswith("serving on"):
            break
    else:
        raise SystemExit("the server did not start")
    threading.Thread(target=lambda: [None for _ in process.stdout], daemon=True).start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:  # "serving on" is printed just before the socket opens
        try:
            urllib.request.urlopen(f"{url}/health", timeout=10).close()
            return process, url
        except urllib.error.URLError:
            if time.time() > deadline or process.poll() is not None:
                raise SystemExit("the server did not start") from None
            time.sleep(0.1)


def resident_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def settings(rng: random.Random, reranking: bool) -> dict:
    body = {"prompt": rng.choice(PROMPTS), "n": rng.randint(1, 4),
            "size": rng.choice(["32x32", "256x256"]), "seed": rng.randrange(1 << 20)}
    if rng.random() < 0.5:
        body["guidance"] = rng.choice([1.0, 2.0, 3.0])
    if reranking and rng.random() < 0.25:
        body["rerank"] = body["n"] * 2
    return body


def raw_request(url: str, body: dict, timeout: float) -> tuple[int, int]:
    """(status, images) of one POST through urllib; errors must have OpenAI's shape."""
    request = urllib.request.Request(f"{url}/v1/images/generations", method="POST",
                                     data=json.dumps(dict(body, response_format="b64_json"))
                                     .encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            answer = json.load(response)
            for item in answer["data"]:
                base64.b64decode(item["b64_json"], validate=True)
            return response.status, len(answer["data"])
    except urllib.error.HTTPError as error:
        answer = json.load(error)
        assert set(answer["error"]) >= {"message", "type", "param", "code"}, answer
        if error.code != 429:
            raise RuntimeError(f"{error.code}: {answer['error']['message']}") from None
        return error.code, 0


def openai_request(client, body: dict) -> tuple[int, int]:
    import openai

    extra = {k: body[k] for k in ("seed", "guidance", "rerank") if k in body}
    try:
        answer = client.images.generate(prompt=body["prompt"], n=body["n"], size=body["size"],
                                        extra_body=extra)
    except openai.RateLimitError as error:
        shape = set(error.response.json()["error"])
        assert shape >= {"message", "type", "param", "code"}, shape
        return 429, 0
    for item in answer.data:  # the files the urls name are there
        with urllib.request.urlopen(item.url, timeout=60) as response:
            assert response.headers["Content-Type"] == "image/png"
    return 200, len(answer.data)


def run_round(url: str, args, round_index: int, reranking: bool) -> list[dict]:
    import openai

    results, lock = [], threading.Lock()

    def client_loop(index: int):
        rng = random.Random(round_index * 1000 + index)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0,
                               timeout=args.timeout) if index % 2 else None
        for _ in range(args.requests):
            body = settings(rng, reranking)  # as request_bodies() makes them
            start = time.perf_counter()
            try:
                status, images = (openai_request(client, body) if client else
                                  raw_request(url, body, args.timeout))
            except Exception as error:  # noqa: BLE001 - a lost or hung request is a failure
                status, images = f"{type(error).__name__}: {error}", 0
            with lock:
                results.append({"status": status, "asked": body["n"], "images": images,
                                "seconds": time.perf_counter() - start})

    threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(args.clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(args.timeout * args.requests)
    assert not any(t.is_alive() for t in threads), "a client is still waiting: a request hung"
    return results


def request_bodies(args, round_index: int, reranking: bool) -> list[dict]:
    """The bodies the clients of one round send, in no particular order."""
    bodies = []
    for index in range(args.clients):
        rng = random.Random(round_index * 1000 + index)
        bodies += [settings(rng, reranking) for _ in range(args.requests)]
    return bodies


def direct_images_per_second(workdir: str, args, reranking: bool) -> tuple[float, float]:
    """The reference, in this process without HTTP: (the generator alone drawing batches of
    `batch_size` 32 px images of one prompt, the image service drawing the first round's
    requests one after another)."""
    from dalle_jax.serving.images import ImageRequest, ImageService

    service = ImageService.from_workdir(workdir, batch_size=args.batch_size)
    try:
        generate = service.generator
        generate(PROMPTS[0], args.batch_size, 0)  # compiles
        start, drawn = time.perf_counter(), 0
        for seed in range(1, 6):
            drawn += len(generate(PROMPTS[seed % len(PROMPTS)], args.batch_size, seed))
        alone = drawn / (time.perf_counter() - start)
        bodies = request_bodies(args, 0, reranking)
        for guidance in (1.0, 2.0):  # compiles the plain and the guided program
            service.generate(ImageRequest(prompt=PROMPTS[0], size="32x32", seed=0,
                                          guidance=guidance))
        start, drawn = time.perf_counter(), 0
        for body in bodies:
            drawn += len(service.generate(ImageRequest(**{k: v for k, v in body.items()})))
        return alone, drawn / (time.perf_counter() - start)
    finally:
        service.close()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main():
    args = parse_args()
    scratch = tempfile.mkdtemp(prefix="server_load-")
    try:
        workdir = args.workdir or tiny_pipeline(scratch)
        reranking = os.path.isdir(os.path.join(workdir, "clip"))
        alone, direct = direct_images_per_second(workdir, args, reranking)
        process, url = start_server(workdir, args)
        try:
            health = json.load(urllib.request.urlopen(f"{url}/health"))
            assert bool(health.get("rerank")) == reranking, health
            rounds, memory = [], []
            for index in range(args.rounds):
                start = time.perf_counter()
                results = run_round(url, args, index, reranking)
                rounds.append((results, time.perf_counter() - start))
                memory.append(resident_bytes(process.pid))
        finally:
            process.terminate()
            process.wait(timeout=120)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    failures = [r for results, _ in rounds for r in results
                if r["status"] not in (200, 429) or (r["status"] == 200
                                                     and r["images"] != r["asked"])]
    answered = [r for results, _ in rounds for r in results if r["status"] == 200]
    refused = sum(r["status"] == 429 for results, _ in rounds for r in results)
    seconds = sum(duration for _, duration in rounds)
    images = sum(r["images"] for r in answered)
    latencies = [r["seconds"] for r in answered]
    growth = memory[-1] / memory[0] - 1
    print(f"{args.rounds} rounds x {args.clients} clients x {args.requests} requests: "
          f"{len(answered)} answered (200), {refused} refused (429), {len(failures)} failed")
    print(f"requests/s {len(answered) / seconds:.2f}, images/s {images / seconds:.2f}, "
          f"latency p50 {percentile(latencies, 0.5):.2f} s, p99 {percentile(latencies, 0.99):.2f} s")
    print(f"the same requests through the image service in this process, one after another: "
          f"{direct:.2f} images/s; server over that: {images / seconds / direct:.2f}")
    print(f"generator alone: {alone:.2f} images/s (batches of {args.batch_size}, 32 px, one "
          f"prompt); server over that: {images / seconds / alone:.2f}")
    print("server resident memory after each round (MiB): "
          + ", ".join(f"{m / 2**20:.0f}" for m in memory) + f" (growth {growth:+.1%})")
    print("command: python benchmarks/server_load.py " + " ".join(sys.argv[1:]))
    if failures:
        raise SystemExit(f"FAIL: {failures[:5]}")
    if growth > args.memory_growth:
        raise SystemExit(f"FAIL: memory grew {growth:.1%} over the rounds")


if __name__ == "__main__":
    main()
