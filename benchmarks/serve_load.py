"""Load on `vengine serve`: N concurrent clients, each sending M streamed chat requests in turn.

It starts a server on 127.0.0.1 (a free port; `--server-args` go to `vengine serve`), warms it
with one request, then for each client count runs the clients (asyncio + httpx, SSE parsed as
it arrives) and reports requests/s, generated tokens/s, and p50/p99 latency and time to first
token (nearest rank: with fewer than 100 requests p99 is the slowest). Bounded: at most 64
clients and 100 requests each, and `--time-limit` seconds per run, after which no client starts
another request. The server is on this machine only; the device is whatever it picks (CUDA
where there is one), so the same command runs on the CPU box and the GPU machine.

    python benchmarks/serve_load.py --clients 1,4,8 --requests 4 --max-tokens 32 \\
        --out docs/serve_load_cpu.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import threading
import time
from datetime import date
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import git_commit, save  # noqa: E402

QUESTIONS = ["Name a fruit.", "What is 2 + 2?", "Say hello.", "Name a colour.",
             "What is the capital of France?", "Name an animal.", "Count to three.",
             "What day comes after Monday?"]


def start_server(server_args: list[str]) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "vengine", "serve", "--host", "127.0.0.1", "--port", "0",
           *server_args]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    for line in proc.stderr:
        sys.stderr.write(line)
        m = re.search(r"at (http://127\.0\.0\.1:\d+)", line)
        if m:
            break
    else:
        raise SystemExit(f"the server did not start (exit {proc.wait()})")
    url = m.group(1)
    threading.Thread(target=lambda: [sys.stderr.write(line) for line in proc.stderr],
                     daemon=True).start()  # drained: a full pipe would stall the server
    for _ in range(600):
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("the server did not answer /health within a minute")


async def one_request(http: httpx.AsyncClient, question: str, max_tokens: int) -> dict:
    body = {"messages": [{"role": "user", "content": question}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True},
            "ignore_eos": True}
    start = time.perf_counter()
    first, tokens = None, 0
    async with http.stream("POST", "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            return {"error": f"{r.status_code}: {(await r.aread()).decode()[:200]}"}
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                return {"error": chunk["error"]["message"]}
            if first is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                first = time.perf_counter() - start
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return {"latency_s": time.perf_counter() - start, "ttft_s": first, "tokens": tokens}


async def run_load(url: str, clients: int, requests: int, max_tokens: int,
                   time_limit: float) -> dict:
    deadline = time.perf_counter() + time_limit
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=time_limit + 60, limits=limits) as http:
        async def client(i: int) -> list[dict]:
            done = []
            for j in range(requests):
                if time.perf_counter() > deadline:
                    break
                done.append(await one_request(http, QUESTIONS[(i + j) % len(QUESTIONS)],
                                              max_tokens))
            return done

        start = time.perf_counter()
        results = [r for rs in await asyncio.gather(*(client(i) for i in range(clients)))
                   for r in rs]
        wall = time.perf_counter() - start
    ok = [r for r in results if "error" not in r]
    errors = [r["error"] for r in results if "error" in r]
    lat = [r["latency_s"] for r in ok]
    ttft = [r["ttft_s"] for r in ok if r["ttft_s"] is not None]
    return {"clients": clients, "requests": len(results), "errors": len(errors),
            "first_error": errors[0] if errors else None, "wall_s": wall,
            "requests_per_s": len(ok) / wall, "tokens_per_s": sum(r["tokens"] for r in ok) / wall,
            "latency_p50_s": _pct(lat, 50), "latency_p99_s": _pct(lat, 99),
            "ttft_p50_s": _pct(ttft, 50), "ttft_p99_s": _pct(ttft, 99)}


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def _median_run(runs: list[dict]) -> dict:
    """Each figure's median over the repeats (counts from the first)."""
    out = dict(runs[0])
    for key, value in runs[0].items():
        if isinstance(value, float):
            values = [r[key] for r in runs if r[key] is not None]
            out[key] = statistics.median(values) if values else None
    out["repeats"] = len(runs)
    return out


def device_name() -> str:
    try:
        gpu = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
        if gpu.returncode == 0 and gpu.stdout.strip():
            return gpu.stdout.strip().splitlines()[0]
    except (OSError, subprocess.TimeoutExpired):
        pass
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                if line.startswith("model name")), platform.processor())
    return f"{cpu}, {len(os.sched_getaffinity(0))} cores"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", default="1,4,8", help="comma-separated client counts (<= 64)")
    ap.add_argument("--requests", type=int, default=4, help="requests per client (<= 100)")
    ap.add_argument("--max-tokens", type=int, default=32, help="tokens generated per request")
    ap.add_argument("--repeats", type=int, default=1, help="runs per client count (medians)")
    ap.add_argument("--time-limit", type=float, default=300.0, help="seconds per run (<= 1800)")
    ap.add_argument("--server-args", default="--ctx 2k", help="flags for `vengine serve`")
    ap.add_argument("--out", type=Path, default=Path("serve_load.json"))
    args = ap.parse_args()
    clients = [int(c) for c in args.clients.split(",")]
    if not all(1 <= c <= 64 for c in clients) or not 1 <= args.requests <= 100:
        ap.error("--clients must be in [1, 64] and --requests in [1, 100]")
    if not 0 < args.time_limit <= 1800 or not 1 <= args.max_tokens <= 4096:
        ap.error("--time-limit must be in (0, 1800] and --max-tokens in [1, 4096]")
    server_args = shlex.split(args.server_args)
    if max(clients) > 8 and "--batch-size" not in server_args:
        server_args += ["--batch-size", str(max(clients))]

    proc, url = start_server(server_args)
    try:
        health = httpx.get(f"{url}/health").json()
        asyncio.run(run_load(url, 1, 1, 4, 60))  # warm: first-call compiles and allocations
        rows = []
        for n in clients:
            runs = [asyncio.run(run_load(url, n, args.requests, args.max_tokens,
                                         args.time_limit)) for _ in range(args.repeats)]
            rows.append(_median_run(runs))
            r = rows[-1]
            print(f"{n:>3} clients: {r['requests']} requests, {r['requests_per_s']:.2f} req/s, "
                  f"{r['tokens_per_s']:.1f} tok/s, latency p50 {r['latency_p50_s']:.2f} s "
                  f"p99 {r['latency_p99_s']:.2f} s, TTFT p50 {r['ttft_p50_s']:.3f} s "
                  f"p99 {r['ttft_p99_s']:.3f} s, {r['errors']} errors", file=sys.stderr)
    finally:
        proc.terminate()
        code = proc.wait(timeout=60)
    save({"benchmark": "serve_load", "date": date.today().isoformat(), "commit": git_commit(),
          "device": device_name(), "model": health["model"], "server_args": server_args,
          "requests_per_client": args.requests, "max_tokens": args.max_tokens,
          "server_exit_code": code, "rows": rows}, args.out)


if __name__ == "__main__":
    main()
