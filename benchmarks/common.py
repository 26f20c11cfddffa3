"""What the benchmark scripts share: how a result names its code and is written, the
Llama-3.1-8B shapes with random weights, and GPU timing (medians, CUDA events, graph replays)."""

from __future__ import annotations

import gc
import json
import statistics
import subprocess
import time
from pathlib import Path

import torch

from vengine.models.config import ModelConfig, RopeScaling
from vengine.models.llama import LlamaForCausalLM

DEV = torch.device("cuda")
DTYPE = torch.bfloat16


def git_commit() -> str:
    """The short commit of this checkout ('' outside git), so each result names its code."""
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                         check=False, cwd=Path(__file__).resolve().parent)
    return git.stdout.strip()


def save(result: dict, path: str | Path) -> None:
    """Write the result as JSON and print it as the last line (what `vengine bench` shows)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))


LLAMA_8B = ModelConfig(arch="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                       num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128,
                       rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=131072,
                       tie_word_embeddings=False, attention_bias=False,
                       rope_scaling=RopeScaling("llama3", 8.0, 1.0, 4.0, 8192))


def build_model(cfg: ModelConfig) -> LlamaForCausalLM:
    torch.manual_seed(0)
    torch.set_default_dtype(DTYPE)
    with DEV:
        model = LlamaForCausalLM(cfg)
    torch.set_default_dtype(torch.float32)
    model.init_rope(DEV)  # RoPE frequencies are computed on the CPU (llama.rope_inv_freq)
    for p in model.parameters():
        if p.dim() == 2:
            p.data.normal_(0.0, 0.02)
    return model.eval()


def median_ms(fn, repeats: int) -> float:
    fn()  # warm (compiles, captures)
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(1e3 * (time.perf_counter() - t))
    return statistics.median(times)


def bulk_copy_gbs(nbytes: int = 2 << 30) -> float:
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(nbytes, dtype=torch.uint8, device=DEV)
    ms = median_ms(lambda: dev.copy_(host, non_blocking=True), 5)
    return nbytes / ms / 1e6


def release() -> None:
    """Free what the last mode left (graphs, buffers) before the next one allocates."""
    gc.collect()
    torch.cuda.empty_cache()


def graphed(fn, generator: torch.Generator | None = None):
    """fn captured in a CUDA graph (after warm-up runs on a side stream); returns replay."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    if generator is not None:
        graph.register_generator_state(generator)
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def gpu_ms(replay, repeats: int = 20) -> float:
    """GPU time of one replay, timed with CUDA events over `repeats` back-to-back replays."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats
