"""ModelConfig: the shapes of one Llama-family model, read from HF config.json or GGUF metadata."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vengine.checks import check_float, check_int
from vengine.errors import ConfigError, ModelLoadError

SUPPORTED_ARCHS = ("llama", "mistral", "qwen2")
_SIZES = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
          "num_kv_heads", "head_dim", "max_position_embeddings")


@dataclass(frozen=True)
class RopeScaling:
    """HF `rope_scaling`: 'linear' divides positions by factor; 'llama3' rescales low
    frequencies."""

    kind: str
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192


@dataclass(frozen=True)
class ModelConfig:
    arch: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    rope_scaling: RopeScaling | None = None

    def __post_init__(self) -> None:
        if self.arch not in SUPPORTED_ARCHS:
            raise ModelLoadError(
                f"unsupported architecture '{self.arch}' (supported: {', '.join(SUPPORTED_ARCHS)})"
            )
        try:  # a bad model file, not a bad flag: the loader adds the file's path
            for name in _SIZES:
                check_int(getattr(self, name), name, lo=1)
            check_float(self.rms_norm_eps, "rms_norm_eps", lo=0, lo_open=True)
            check_float(self.rope_theta, "rope_theta", lo=0, lo_open=True)
        except ConfigError as e:
            raise ModelLoadError(str(e)) from None
        if self.num_heads % self.num_kv_heads:
            raise ModelLoadError(
                f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}"
            )

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * dtype_bytes

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> ModelConfig:
        arch = cfg.get("model_type", "")
        if arch not in SUPPORTED_ARCHS:
            raise ModelLoadError(
                f"unsupported architecture '{arch}' (supported: {', '.join(SUPPORTED_ARCHS)})"
            )
        rope = cfg.get("rope_parameters") or {}  # transformers 5 keeps theta and scaling here
        try:
            hidden, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
            head_dim = cfg.get("head_dim") or hidden // heads
            return cls(
                arch=arch,
                vocab_size=int(cfg["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(cfg["intermediate_size"]),
                num_layers=int(cfg["num_hidden_layers"]),
                num_heads=heads,
                num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
                head_dim=int(head_dim),
                rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
                rope_theta=float(cfg.get("rope_theta") or rope.get("rope_theta", 10000.0)),
                max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                attention_bias=bool(cfg.get("attention_bias", arch == "qwen2")),
                rope_scaling=_rope_scaling(cfg.get("rope_scaling") or rope),
            )
        except KeyError as e:
            raise ModelLoadError(f"config.json lacks the field {e}") from None

    @classmethod
    def from_gguf(cls, meta: dict[str, Any], has_output_tensor: bool) -> ModelConfig:
        arch = meta.get("general.architecture", "")
        if arch not in ("llama", "qwen2"):
            raise ModelLoadError(
                f"unsupported GGUF architecture '{arch}' (supported: llama, qwen2)"
            )

        def get(key: str, default: Any = None) -> Any:
            value = meta.get(f"{arch}.{key}", default)
            if value is None:
                raise ModelLoadError(f"GGUF metadata lacks '{arch}.{key}'")
            return value

        heads = int(get("attention.head_count"))
        hidden = int(get("embedding_length"))
        vocab = meta.get(f"{arch}.vocab_size") or len(meta.get("tokenizer.ggml.tokens", []))
        scaling = None
        if meta.get(f"{arch}.rope.scaling.type") == "linear":
            scaling = RopeScaling("linear", float(get("rope.scaling.factor")))
        return cls(
            arch=arch,
            vocab_size=int(vocab),
            hidden_size=hidden,
            intermediate_size=int(get("feed_forward_length")),
            num_layers=int(get("block_count")),
            num_heads=heads,
            num_kv_heads=int(get("attention.head_count_kv", heads)),
            head_dim=int(meta.get(f"{arch}.attention.key_length") or hidden // heads),
            rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=float(get("rope.freq_base", 10000.0)),
            max_position_embeddings=int(get("context_length", 4096)),
            tie_word_embeddings=not has_output_tensor,
            attention_bias=arch == "qwen2",
            rope_scaling=scaling,
        )


def _rope_scaling(spec: dict[str, Any] | None) -> RopeScaling | None:
    if not spec:
        return None
    kind = spec.get("rope_type") or spec.get("type")
    if kind in (None, "default"):
        return None
    if kind == "linear":
        return RopeScaling("linear", float(spec["factor"]))
    if kind == "llama3":
        return RopeScaling(
            "llama3",
            float(spec["factor"]),
            float(spec.get("low_freq_factor", 1.0)),
            float(spec.get("high_freq_factor", 4.0)),
            int(spec.get("original_max_position_embeddings", 8192)),
        )
    raise ModelLoadError(f"unsupported rope_scaling type '{kind}' (supported: linear, llama3)")
