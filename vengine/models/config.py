"""ModelConfig: the shapes of one Llama-family model, read from HF config.json or GGUF metadata.

Family quirks are features of the config (flags and per-layer lists) that the one decoder in
llama.py reads, not a file per model: Qwen3's per-head q/k norms (`qk_norm`), SmolLM3's layers
without RoPE (`rope_layers`), sliding-window layers (`layer_windows`, Gemma 3 and Mistral) with
their own RoPE base (`local_rope_theta`), Gemma's (1 + w) norms around attention and MLP,
tanh-GELU, scaled embeddings and query scale (`gemma`), and Gemma 2's tanh caps on attention
scores and logits (`attn_softcap`, `final_logit_softcap`)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from vengine.checks import check_float, check_int
from vengine.errors import ConfigError, ModelLoadError

SUPPORTED_ARCHS = ("llama", "mistral", "qwen2", "qwen3", "smollm3", "gemma2", "gemma3_text",
                   "phi3")
GGUF_ARCHS = ("llama", "qwen2", "qwen3", "smollm3", "gemma2", "gemma3", "phi3")
GEMMA3_LOCAL_ROPE_THETA = 10_000.0  # transformers' Gemma3TextConfig default; GGUFs omit it
GEMMA3_PATTERN = 6  # five sliding-window layers, then a global one (transformers' default)
GEMMA2_PATTERN = 2  # a sliding-window layer, then a global one (transformers and llama.cpp)
_SIZES = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
          "num_kv_heads", "head_dim", "max_position_embeddings")


@dataclass(frozen=True)
class RopeScaling:
    """HF `rope_scaling`: 'linear' divides positions by factor; 'llama3' rescales low
    frequencies; 'longrope' (Phi-3) divides each frequency by its short or long factor and
    scales cos and sin by attention_factor."""

    kind: str
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192
    short_factor: tuple[float, ...] = ()
    long_factor: tuple[float, ...] = ()
    attention_factor: float = 1.0


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
    qk_norm: bool = False  # Qwen3: RMSNorm over each head's q and k, before RoPE
    rope_layers: tuple[bool, ...] | None = None  # per layer, whether RoPE applies; None: all
    layer_windows: tuple[int, ...] | None = None  # per layer: sliding window (tokens), 0 global
    local_rope_theta: float | None = None  # RoPE base of the window layers (None: rope_theta)
    gemma: bool = False  # (1 + w) RMSNorms before and after attention and MLP, tanh-GELU MLP,
    # embeddings times sqrt(hidden)
    query_pre_attn_scalar: float | None = None  # scores scaled by its -1/2 power (None: head_dim)
    final_logit_softcap: float | None = None
    attn_softcap: float | None = None  # Gemma 2: every score s becomes cap * tanh(s / cap)
    rotary_dim: int | None = None  # leading dims of each head that RoPE turns (None: all)

    def window(self, layer: int) -> int:
        """The layer's sliding window in tokens, 0 for a global layer."""
        return self.layer_windows[layer] if self.layer_windows else 0

    @property
    def global_layers(self) -> tuple[int, ...]:
        """The layers that attend over the whole context (their KV is the host pool's)."""
        return tuple(i for i in range(self.num_layers) if not self.window(i))

    def uses_rope(self, layer: int) -> bool:
        return self.rope_layers is None or self.rope_layers[layer]

    def layer_kinds(self) -> str:
        """What `vengine info` says about the layers: how many global and sliding-window, RoPE."""
        rope = sum(self.uses_rope(i) for i in range(self.num_layers))
        n_global = len(self.global_layers)
        kinds = f"{n_global} global attention layers"
        if n_global < self.num_layers:
            windows = sorted({self.window(i) for i in range(self.num_layers)} - {0})
            kinds += (f", {self.num_layers - n_global} sliding-window "
                      f"({'/'.join(map(str, windows))} tokens, KV on the device)")
        if rope < self.num_layers:
            kinds += f" ({rope} with RoPE, {self.num_layers - rope} without)"
        kinds += ", RMSNorm on each head's q and k" if self.qk_norm else ""
        return kinds + (f", scores soft-capped at {self.attn_softcap:g}" if self.attn_softcap
                        else "")

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
        if self.rope_layers is not None and len(self.rope_layers) != self.num_layers:
            raise ModelLoadError(f"rope layers list has {len(self.rope_layers)} entries for "
                                 f"{self.num_layers} layers")
        if self.layer_windows is not None and len(self.layer_windows) != self.num_layers:
            raise ModelLoadError(f"layer windows list has {len(self.layer_windows)} entries for "
                                 f"{self.num_layers} layers")
        if self.num_heads % self.num_kv_heads:
            raise ModelLoadError(
                f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}"
            )

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        """K and V of one token in the global layers (the pool's; window layers keep a ring)."""
        return 2 * len(self.global_layers) * self.num_kv_heads * self.head_dim * dtype_bytes

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> ModelConfig:
        arch = cfg.get("model_type", "")
        if arch not in SUPPORTED_ARCHS:
            raise ModelLoadError(
                f"unsupported architecture '{arch}' (supported: {', '.join(SUPPORTED_ARCHS)})"
            )
        rope = cfg.get("rope_parameters") or {}  # transformers 5 keeps theta and scaling here
        gemma3 = arch == "gemma3_text"
        gemma = gemma3 or arch == "gemma2"
        local: dict[str, Any] = {}
        if gemma3:  # transformers 5: rope_parameters per layer type
            local = rope.get("sliding_attention") or {}
            rope = rope.get("full_attention", rope)
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
                rope_theta=float(cfg.get("rope_theta") or rope.get("rope_theta",
                                                              1e6 if gemma3 else 10000.0)),
                max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", gemma)),
                attention_bias=bool(cfg.get("attention_bias", arch == "qwen2")),
                rope_scaling=_rope_scaling(cfg.get("rope_scaling") or rope, cfg),
                qk_norm=arch in ("qwen3", "gemma3_text"),
                rope_layers=_rope_layers(cfg) if arch == "smollm3" else None,
                layer_windows=_layer_windows(cfg),
                local_rope_theta=float(local.get("rope_theta") or cfg.get(
                    "rope_local_base_freq", GEMMA3_LOCAL_ROPE_THETA)) if gemma3 else None,
                gemma=gemma,
                query_pre_attn_scalar=float(cfg.get("query_pre_attn_scalar", 256))
                if gemma else None,
                final_logit_softcap=cfg.get("final_logit_softcapping") if gemma else None,
                attn_softcap=cfg.get("attn_logit_softcapping") or None,
                rotary_dim=_rotary_dim(cfg, rope, int(head_dim)),
            )
        except KeyError as e:
            raise ModelLoadError(f"config.json lacks the field {e}") from None

    @classmethod
    def from_gguf(cls, meta: dict[str, Any], has_output_tensor: bool,
                  rope_factors: dict[str, tuple[float, ...]] | None = None) -> ModelConfig:
        """rope_factors: a Phi-3 GGUF's LongRoPE factors, which llama.cpp's converter writes as
        the tensors rope_factors_short / rope_factors_long ("short", "long")."""
        arch = meta.get("general.architecture", "")
        if arch not in GGUF_ARCHS:
            raise ModelLoadError(
                f"unsupported GGUF architecture '{arch}' (supported: {', '.join(GGUF_ARCHS)})"
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
        n_layers = int(get("block_count"))
        head_dim = int(meta.get(f"{arch}.attention.key_length") or hidden // heads)
        rotary = int(meta.get(f"{arch}.rope.dimension_count") or head_dim)
        if rope_factors:  # Phi-3 LongRoPE: the factor is the context over the original's
            original = int(get("rope.scaling.original_context_length"))
            scaling = RopeScaling("longrope", int(get("context_length")) / original,
                                  original_max_position=original,
                                  short_factor=rope_factors["short"],
                                  long_factor=rope_factors["long"],
                                  attention_factor=float(get("rope.scaling.attn_factor", 1.0)))
        gemma3, gemma, windows = arch == "gemma3", arch in ("gemma2", "gemma3"), None
        if gemma:  # llama.cpp's fixed patterns: five (Gemma 3) or one (Gemma 2) sliding-window
            # layers, then a global one
            every = GEMMA3_PATTERN if gemma3 else GEMMA2_PATTERN
            window = int(get("attention.sliding_window"))
            windows = tuple(window if (i + 1) % every else 0 for i in range(n_layers))
        elif arch == "phi3" and meta.get(f"{arch}.attention.sliding_window"):  # Phi-3 mini 4K:
            windows = (int(get("attention.sliding_window")),) * n_layers  # every layer (0: none)
        # llama.cpp scales Gemma's scores by key_length ** -0.5 (query_pre_attn_scalar = head_dim)
        # but for Gemma 2 27B (46 layers): hidden / heads, as transformers' config says
        scalar = hidden / heads if arch == "gemma2" and n_layers == 46 else float(head_dim)
        return cls(
            arch="gemma3_text" if gemma3 else arch,
            vocab_size=int(vocab),
            hidden_size=hidden,
            intermediate_size=int(get("feed_forward_length")),
            num_layers=n_layers,
            num_heads=heads,
            num_kv_heads=int(get("attention.head_count_kv", heads)),
            head_dim=head_dim,
            rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=float(get("rope.freq_base", 10000.0)),
            max_position_embeddings=int(get("context_length", 4096)),
            tie_word_embeddings=not has_output_tensor,
            attention_bias=arch == "qwen2",
            rope_scaling=scaling,
            qk_norm=arch in ("qwen3", "gemma3"),
            rope_layers=_gguf_rope_layers(meta, arch, n_layers),
            layer_windows=windows,
            # Not in a Gemma 3 GGUF: transformers' local RoPE base
            local_rope_theta=GEMMA3_LOCAL_ROPE_THETA if gemma3 else None,
            gemma=gemma,
            query_pre_attn_scalar=scalar if gemma else None,
            final_logit_softcap=meta.get(f"{arch}.final_logit_softcapping") if gemma else None,
            attn_softcap=meta.get(f"{arch}.attn_logit_softcapping") or None,
            rotary_dim=rotary if rotary != head_dim else None,
        )


def _rotary_dim(cfg: dict[str, Any], rope: dict[str, Any], head_dim: int) -> int | None:
    """Phi-4-mini's partial_rotary_factor (0.75): RoPE turns only the first dims of a head."""
    factor = float(cfg.get("partial_rotary_factor") or rope.get("partial_rotary_factor") or 1.0)
    return None if factor == 1.0 else int(head_dim * factor)


def _rope_scaling(spec: dict[str, Any] | None, cfg: dict[str, Any] | None = None
                  ) -> RopeScaling | None:
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
    if kind == "longrope":
        original = int(spec.get("original_max_position_embeddings")
                       or (cfg or {}).get("original_max_position_embeddings"))
        factor = spec.get("factor") or int((cfg or {})["max_position_embeddings"]) / original
        attention = spec.get("attention_factor") or (
            math.sqrt(1 + math.log(factor) / math.log(original)) if factor > 1 else 1.0)
        return RopeScaling("longrope", float(factor), original_max_position=original,
                           short_factor=tuple(map(float, spec["short_factor"])),
                           long_factor=tuple(map(float, spec["long_factor"])),
                           attention_factor=float(attention))
    raise ModelLoadError(f"unsupported rope_scaling type '{kind}' "
                         "(supported: linear, llama3, longrope)")


def _rope_layers(cfg: dict[str, Any]) -> tuple[bool, ...]:
    """SmolLM3's `no_rope_layers` (1: RoPE, 0: none), or its default: no RoPE on every
    `no_rope_layer_interval`-th layer (as transformers builds it)."""
    n = int(cfg["num_hidden_layers"])
    flags = cfg.get("no_rope_layers")
    if flags is None:
        every = int(cfg.get("no_rope_layer_interval", 4))
        flags = [(i + 1) % every != 0 for i in range(n)]
    return tuple(bool(f) for f in flags)


def _gguf_rope_layers(meta: dict[str, Any], arch: str, n: int) -> tuple[bool, ...] | None:
    """llama.cpp's smollm3 GGUFs carry no layer list: its converter and runtime use the fixed
    interval 4 (every 4th layer without RoPE), the transformers default."""
    if arch != "smollm3":
        return None
    every = int(meta.get(f"{arch}.no_rope_layer_interval", 4))
    return tuple((i + 1) % every != 0 for i in range(n))


def _layer_windows(cfg: dict[str, Any]) -> tuple[int, ...] | None:
    """Per-layer sliding windows from HF `layer_types` and `sliding_window` (Gemma 3, Qwen3,
    SmolLM3), or every layer for Mistral's `sliding_window`; None when no layer has one."""
    window = cfg.get("sliding_window")
    if not window or cfg.get("use_sliding_window") is False:
        return None
    n = int(cfg["num_hidden_layers"])
    types = cfg.get("layer_types")
    if types is None and cfg.get("model_type") in ("gemma2", "gemma3_text"):
        every = int(cfg.get("sliding_window_pattern", GEMMA3_PATTERN)
                    if cfg["model_type"] == "gemma3_text" else GEMMA2_PATTERN)
        types = ["sliding_attention" if (i + 1) % every else "full_attention" for i in range(n)]
    if types is None:
        types = ["sliding_attention"] * n
    return tuple(int(window) if t == "sliding_attention" else 0 for t in types)
