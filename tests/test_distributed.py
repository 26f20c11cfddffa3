"""Issue 23: batch generation on Ray workers (`generate --workers N`, `generate_pool`): the
completions one engine gives, requests read only as workers free slots, nothing lost or
duplicated when a worker or the driver is killed, Ray imported only with --workers, bad flags
caught at once.

One local Ray cluster (2 CPUs, one a worker) serves the module; the pools in this process use it
(a pool takes the Ray its process already joined), the killed driver is a real process that
joins it by address. Greedy results are compared with one engine in this process.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import torch
from helpers import kill_9_mid_run

import vengine
from vengine.distributed import EnginePool, generate_pool
from vengine.engine.sampling import SamplingParams

ROOT = Path(__file__).resolve().parents[1]
FLAGS = ["--batch-size", "2", "--ctx", "1024"]


ISGENERATOR = inspect.isgenerator  # before any `import ray` (the cluster fixture restores it)


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def prompts(n: int) -> list[dict]:
    """Rows of unequal lengths (so workers finish at different times), one through the chat
    template."""
    rows = [{"id": f"r{i}", "prompt": f"Write a list of {i + 3} animals:",
             "max_new_tokens": 4 + 5 * (i % 3)} for i in range(n - 1)]
    return rows + [{"id": "chat", "messages": [{"role": "user", "content": "Say hello."}],
                    "max_new_tokens": 6}]


@pytest.fixture(scope="module")
def cluster():
    """A local Ray cluster for the module: its head's address. What importing Ray and ray.init
    change in this process (environment variables, the SIGTERM handler, sys.excepthook, and
    inspect.isgenerator, which `import ray` replaces by a wrapper whose __module__ is None: the
    eval corpus, read from the standard library's docstrings, must not change after this
    module) is put back after."""
    temp = tempfile.mkdtemp(prefix="vray-")  # short: Ray's socket paths must fit 107 bytes
    env, sigterm, excepthook = dict(os.environ), signal.getsignal(signal.SIGTERM), sys.excepthook
    import ray  # here, not at collection: the test extra installs it (vengine[distributed])

    context = ray.init(address="local", num_cpus=2, include_dashboard=False,
                       object_store_memory=80 * 2**20, _temp_dir=temp,
                       logging_level=logging.ERROR, log_to_driver=False)
    yield context.address_info["gcs_address"]
    ray.shutdown()
    shutil.rmtree(temp, ignore_errors=True)
    os.environ.clear()
    os.environ.update(env)
    signal.signal(signal.SIGTERM, sigterm)
    sys.excepthook = excepthook
    inspect.isgenerator = ISGENERATOR


@pytest.fixture(scope="module")
def llm():
    return vengine.LLM(max_context=1024)


def rows_by_id(rows: list[dict]) -> dict:
    return {row["id"]: (row["text"], row["completion_tokens"]) for row in rows}


def reference(llm, rows: list[dict]) -> dict:
    """{id: (text, completion tokens)} from one engine in this process, on one thread: the two
    cores are the workers', and two threads on a busy box ran this 7x slower than one."""
    requests = [(r["id"], llm.prompt_ids(r.get("messages") or r["prompt"]),
                 SamplingParams(max_new_tokens=r["max_new_tokens"])) for r in rows]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return {key: (c.text, len(c.token_ids)) for key, c in llm.completions(requests)}
    finally:
        torch.set_num_threads(threads)


def test_pool_equals_one_engine_and_reads_requests_lazily(cluster, llm):
    rows = prompts(7)
    pulled = []

    def requests():
        for n, r in enumerate(rows, 1):
            pulled.append(n)
            yield (r["id"], r.get("messages") or r["prompt"],
                   SamplingParams(max_new_tokens=r["max_new_tokens"]))

    got, pulled_at_first = {}, None
    for key, completion in generate_pool(requests(), workers=2, max_context=1024, max_batch=2):
        pulled_at_first = pulled_at_first or len(pulled)
        assert key not in got, f"{key} twice"
        got[key] = (completion.text, len(completion.token_ids))
    assert got == reference(llm, rows)
    # 2 workers x 2 slots, and the finished worker topped up (one call may finish both its own)
    assert pulled_at_first <= 2 * 2 + 2 < len(rows), "requests are read as slots free, not at once"


def test_a_killed_worker_loses_and_duplicates_nothing(cluster, llm, tmp_path, cli, monkeypatch):
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    rows = prompts(10)
    write_jsonl(src, rows)
    pools, killed = [], []
    start = EnginePool.__init__

    def remember(self, *args, **kwargs):
        start(self, *args, **kwargs)
        pools.append(self)

    def kill_a_worker_after_the_first_row() -> None:
        deadline = time.time() + 120
        while time.time() < deadline and not (out.exists() and out.read_text().count("\n")):
            time.sleep(0.05)
        victim = pools[0].workers[0]
        killed.append((victim.info.pid, len(victim.held)))
        os.kill(victim.info.pid, signal.SIGKILL)

    monkeypatch.setattr(EnginePool, "__init__", remember)
    killer = threading.Thread(target=kill_a_worker_after_the_first_row, daemon=True)
    killer.start()
    r = cli("generate", "--input", str(src), "--output", str(out), "--workers", "2", *FLAGS)
    killer.join(timeout=5)
    assert r.returncode == 0, r.stderr
    assert killed and killed[0][1] > 0, "the worker must hold unfinished requests when it dies"
    assert [w.pid for w in pools[0].dead] == [killed[0][0]], "the pool must see it die"
    assert f"worker pid {killed[0][0]} died mid-run" in r.stderr
    got = read_jsonl(out)
    assert sorted(row["id"] for row in got) == sorted(row["id"] for row in rows), "each id once"
    assert rows_by_id(got) == reference(llm, rows)


def test_driver_kill_9_then_rerun_completes(cluster, tmp_path, cli):
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    rows = prompts(12)
    write_jsonl(src, rows)
    args = ["generate", "--input", str(src), "--output", str(out), "--workers", "2",
            "--ray-address", cluster, *FLAGS]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}  # now with the token mode ray.init set
    partial = kill_9_mid_run(args, out, len(rows), "r9", env=env, cwd=ROOT)
    r = cli(*args)
    assert r.returncode == 0, r.stderr
    assert f"{len(partial)} already done" in r.stderr
    got = read_jsonl(out)
    assert sorted(row["id"] for row in got) == sorted(row["id"] for row in rows), "each id once"
    assert got[: len(partial)] == partial, "finished rows are never rewritten"


def test_ray_is_imported_only_with_workers(tmp_path):
    """`import vengine` and a run without --workers (up to its model load) never import Ray."""
    write_jsonl(tmp_path / "in.jsonl", prompts(2))
    (tmp_path / "unloadable.gguf").write_bytes(b"not a GGUF file")
    code = ("import sys, vengine; from vengine.cli.main import main; "
            "code = main(sys.argv[1:]); print(code, 'ray' in sys.modules)")
    argv = ["generate", "--input", str(tmp_path / "in.jsonl"), "--output",
            str(tmp_path / "out.jsonl"), "--model", str(tmp_path / "unloadable.gguf")]
    run = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True,
                         check=False, env={**os.environ, "HF_HUB_OFFLINE": "1"}, cwd=ROOT,
                         timeout=120)
    assert "unloadable.gguf" in run.stderr, "the run must get as far as loading the model"
    assert run.stdout.split() == ["2", "False"], run.stdout + run.stderr


@pytest.mark.parametrize("flags,message", [
    (["--workers", "0"], "--workers must be an int in [1, 4096], got 0"),
    (["--workers", "-3"], "--workers must be an int in [1, 4096], got -3"),
    (["--workers", "2", "--ray-address", "head-node"], "--ray-address must be host:port"),
    (["--workers", "2", "--ray-address", "127.0.0.1:99999"], "the port must be in [1, 65535]"),
    (["--workers", "2", "--ray-address", "127.0.0.1:1"],
     "--ray-address 127.0.0.1:1: cannot connect"),
    (["--ray-address", "auto"], "--ray-address goes with --workers"),
    (["--workers", "3"], "--workers 3: the Ray cluster has 2 CPUs"),
])
def test_bad_flags_are_one_line_and_lose_nothing(cluster, tmp_path, cli, flags, message):
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_jsonl(src, prompts(3))
    out.write_text('{"id": "earlier", "text": "work"}\n')
    r = cli("generate", "--input", str(src), "--output", str(out), *flags)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("vengine: error: "), r.stderr
    assert message in r.stderr, r.stderr
    assert out.read_text() == '{"id": "earlier", "text": "work"}\n', "nothing written is lost"


def test_workers_without_ray_say_how_to_install_it(tmp_path, cli, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    write_jsonl(tmp_path / "in.jsonl", prompts(2))
    r = cli("generate", "--input", str(tmp_path / "in.jsonl"), "--output",
            str(tmp_path / "out.jsonl"), "--workers", "2")
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "pip install vengine[distributed]" in r.stderr
    assert not (tmp_path / "out.jsonl").exists()
    r = cli("generate", "--prompt", "hi", "--workers", "2")
    assert r.returncode == 2 and "--workers goes with --input" in r.stderr, r.stderr
