"""Flags shared by the commands that load a model, checked before the model loads.

Every check that needs no model runs first (loading the default model takes ~10 s on two cores),
and errors name the flag the user typed, not the engine's field behind it.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path
from typing import Any

from vengine.errors import ConfigError

# engine / SamplingParams field -> the flag that sets it
FLAGS = {
    "max_new_tokens": "--max-new-tokens", "temperature": "--temperature", "top_p": "--top-p",
    "top_k": "--top-k", "repetition_penalty": "--repetition-penalty", "seed": "--seed",
    "max_context": "--ctx", "host_mem": "--host-mem", "gpu_mem": "--gpu-mem", "kv": "--kv",
    "kv_dtype": "--kv-dtype", "VAttention.epsilon": "--epsilon",
    "VAttention.delta": "--delta", "VAttention.guarantee": "--guarantee",
    "VAttention.row_cache": "--row-cache", "device": "--device", "dtype": "--dtype",
    "max_batch": "--batch-size", "threads": "--threads", "attention": "--attention",
    "workers": "--workers", "ray_address": "--ray-address",
    "weights": "--weights",
}
MODEL_HELP = ("HF directory (config.json + *.safetensors), .gguf file, or a hub id 'org/name' "
              "fetched with huggingface_hub (default: SmolLM2-135M-Instruct)")


def add_threads_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, help="CPU threads for torch and numba "
                   "(default: the cores this process may use: affinity mask and cgroup quota)")


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help=MODEL_HELP)
    p.add_argument("--ctx", default="8k", help="context length in tokens: 8192, 8k, 128K")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda")
    p.add_argument("--dtype", default="auto", help="auto, float32, bfloat16, float16")
    p.add_argument("--attention", choices=("full", "vattention"), default="vattention",
                   help="vattention (default: verified sparse decode, KV in host memory) or full "
                        "(exact; on a GPU the KV stays in GPU memory)")
    p.add_argument("--epsilon", type=float, help="vAttention relative error bound (default 0.05)")
    p.add_argument("--delta", type=float, help="vAttention failure probability (default 0.05)")
    p.add_argument("--guarantee", choices=("denominator", "output"),
                   help="what epsilon bounds: the attention denominator (default) or output")
    p.add_argument("--row-cache", type=int, help="vAttention: keep each step's exact rows on "
                   "the GPU for this many sequences, so the next step reads over PCIe only the "
                   "rows it did not read (default 0: off)")
    p.add_argument("--host-mem", help="host KV cap, e.g. 64GiB (default: the batch's full "
                   "contexts, within 3/4 of the available RAM; memory is taken as used)")
    p.add_argument("--gpu-mem", help="GPU memory to plan within, e.g. 24GiB (default: what is "
                   "free at start): the weights, key codes, resident pages and workspaces")
    p.add_argument("--kv", choices=("auto", "host", "device"), default="auto",
                   help="where the KV lives: auto (host memory for vattention, GPU for full), "
                        "host or device")
    p.add_argument("--kv-dtype", choices=("auto", "fp8"), default="auto",
                   help="how K/V rows are stored: auto (the model dtype) or fp8 (e4m3 with a "
                        "scale per row: half the host memory and PCIe bytes)")
    p.add_argument("--weights", choices=("auto", "dense", "int8", "int4"), default="auto",
                   help="how linear weights are held: dense (in --dtype), int8 (per output row) "
                        "or int4 (groups of 32 where the GGUF stores 5 bits or fewer, int8 "
                        "elsewhere), the compact ones CPU only; auto: int4 on a CPU in "
                        "bfloat16, else dense")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="default 512, or 32768 with --input")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int)
    add_threads_arg(p)


def as_flag_error(e: ConfigError) -> ConfigError:
    """The same error with the engine's field name replaced by the flag that set it."""
    message = str(e)
    field = getattr(e, "field", None)
    if field is None:  # errors raised before `field` existed lead with the field's name
        m = re.match(r"[A-Za-z_][\w.]*", message)
        field = m.group(0) if m else None
    flag = FLAGS.get(field or "")
    if flag is None or field not in message:
        return e
    return ConfigError(message.replace(field, flag, 1), field=field)


def sampling_flags(args: argparse.Namespace, max_new_tokens: int = 512) -> dict[str, Any]:
    """The sampling defaults the flags set, checked (SamplingParams) with the flags' names."""
    from vengine.engine.sampling import SamplingParams

    sampling = {"max_new_tokens": max_new_tokens if args.max_new_tokens is None
                else args.max_new_tokens, "temperature": args.temperature, "top_p": args.top_p,
                "top_k": args.top_k, "seed": args.seed,
                "repetition_penalty": args.repetition_penalty}
    try:
        SamplingParams(**sampling)
    except ConfigError as e:
        raise as_flag_error(e) from None
    return sampling


def engine_options(args: argparse.Namespace, **options: Any) -> dict[str, Any]:
    """Keyword arguments for vengine.LLM, checked now (EngineConfig) with the flags' names."""
    from vengine import VAttention
    from vengine.engine.config import EngineConfig

    attention: Any = "full"
    given = [f for f in ("epsilon", "delta", "guarantee", "row_cache")
             if getattr(args, f) is not None]
    try:
        if args.attention == "vattention":
            attention = VAttention(**{f: getattr(args, f) for f in given})
        elif given:
            raise ConfigError(f"{FLAGS['VAttention.' + given[0]]} applies only with "
                              "--attention vattention")
        if args.host_mem:
            options["host_mem"] = args.host_mem
        if args.gpu_mem:
            options["gpu_mem"] = args.gpu_mem
        if args.kv != "auto":
            options["kv"] = args.kv
        if args.kv_dtype != "auto":
            options["kv_dtype"] = args.kv_dtype
        if args.weights != "auto":
            options["weights"] = args.weights
        kwargs = dict(model=args.model, device=args.device, dtype=args.dtype,
                      max_context=args.ctx, attention=attention, threads=args.threads,
                      **options)
        EngineConfig(**kwargs)
    except ConfigError as e:
        raise as_flag_error(e) from None
    apply_threads(args.threads)
    return kwargs


def apply_threads(threads: int | None) -> int:
    """set_threads with the error naming --threads."""
    from vengine.engine.threads import set_threads

    try:
        return set_threads(threads)
    except ConfigError as e:
        raise as_flag_error(e) from None


def resolve_model_flag(model: str | None):
    """The model's source (path and kind) without loading it: a bad --model fails at once."""
    from vengine.models.loader import resolve_model

    return resolve_model(model)


def load_llm(kwargs: dict[str, Any]):
    """Load the model (saying so on a terminal, where it takes seconds), and warn once when the
    context is longer than the model was trained for."""
    from vengine import LLM

    source = resolve_model_flag(kwargs.get("model"))
    tty = sys.stderr.isatty()
    if tty:
        print(f"loading {source.path.name} ...", end="", file=sys.stderr, flush=True)
    start = time.perf_counter()
    llm = LLM(**{**kwargs, "model": str(source.path)})
    if tty:
        print(f" {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
    trained = llm.model.config.max_position_embeddings
    if llm.config.max_context > trained:
        print(f"vengine: warning: --ctx {llm.config.max_context} is longer than the "
              f"{trained} tokens {Path(source.path).name} was trained on; output past "
              f"{trained} tokens may be poor", file=sys.stderr)
    return llm


def start_pool(config, kwargs: dict[str, Any]):
    """Start the engine workers on Ray (saying so on a terminal: each loads the model)."""
    from vengine.distributed import EnginePool

    tty = sys.stderr.isatty()
    if tty:
        print(f"starting {config.workers} workers on Ray ...", end="", file=sys.stderr, flush=True)
    start = time.perf_counter()
    pool = EnginePool(config, **kwargs)
    if tty:
        print(f" {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
    return pool
