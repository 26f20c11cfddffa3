"""One forward for the Llama family (Llama 2/3/3.1/3.2, Mistral, Qwen2/2.5, Qwen3, SmolLM2/3,
Gemma 3, Phi-3 / Phi-4-mini).

Tokens of a step are flattened to [T]; what the attention needs about the step (which sequences,
where their KV lives) travels in `ctx`, and `attention(layer, q, k, v, ctx)` attends (the engine's
LayerBackends: any callable of that shape), so `forward` never grows flags.
Q/K/V and gate/up are fused into one matmul each at load time.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vengine.errors import ModelLoadError
from vengine.models.config import ModelConfig
from vengine.models.quant import QuantEmbedding

Attend = Callable[..., torch.Tensor]  # (layer, q, k, v, ctx) -> attention output [T, Hq, D]
# (parameter name, weight, bias or None) -> the module that replaces a linear layer
Compact = Callable[[str, torch.Tensor, "torch.Tensor | None"], nn.Module]


def rope_inv_freq(cfg: ModelConfig, local: bool = False, long: bool = False) -> torch.Tensor:
    """Inverse frequencies [rotary_dim / 2] with linear, llama3 or longrope scaling applied
    (local: the sliding-window layers' base, unscaled, as transformers' Gemma 3; long:
    LongRoPE's long factors, for a context past its original length)."""
    theta = cfg.local_rope_theta if local else cfg.rope_theta
    dim = cfg.rotary_dim or cfg.head_dim
    # on the CPU even under a meta-device build: meta arithmetic imports torch._dynamo (1.9 s)
    inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, device="cpu").double() / dim)
    s = None if local else cfg.rope_scaling
    if s is None:
        return inv_freq.float()
    if s.kind == "linear":
        return (inv_freq / s.factor).float()
    if s.kind == "longrope":
        factors = torch.tensor(s.long_factor if long else s.short_factor, dtype=torch.float32,
                               device="cpu")
        return 1.0 / (factors * theta ** (torch.arange(0, dim, 2, device="cpu").float() / dim))
    low_wavelen = s.original_max_position / s.low_freq_factor
    high_wavelen = s.original_max_position / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (s.original_max_position / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled).float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, H, D]; cos, sin: [T, 1, R] in x's dtype (rotate-half layout, as in HF): the first
    R dims turn, the rest pass (Phi-4-mini's partial rotary)."""
    R = cos.shape[-1]
    if R < x.shape[-1]:
        return torch.cat((apply_rope(x[..., :R], cos, sin), x[..., R:]), dim=-1)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 and cast back before the weight, exactly as transformers does.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class GemmaRMSNorm(RMSNorm):
    """Gemma's: the weight is an offset from 1 and applies in fp32, before the cast back."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * (1.0 + self.weight.float())).to(x.dtype)


def make_norm(cfg: ModelConfig, dim: int) -> RMSNorm:
    return (GemmaRMSNorm if cfg.gemma else RMSNorm)(dim, cfg.rms_norm_eps)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = (
            cfg.num_heads,
            cfg.num_kv_heads,
            cfg.head_dim,
        )
        qkv_out = (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
        self.qkv_proj = nn.Linear(cfg.hidden_size, qkv_out, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=False)
        self.use_rope = cfg.uses_rope(layer_idx)
        self.local = bool(cfg.window(layer_idx)) and cfg.local_rope_theta is not None
        if cfg.qk_norm:
            self.q_norm, self.k_norm = make_norm(cfg, cfg.head_dim), make_norm(cfg, cfg.head_dim)
        else:
            self.q_norm = self.k_norm = nn.Identity()
        # The backends scale scores by head_dim ** -0.5; Gemma's query_pre_attn_scalar may differ
        scalar = cfg.query_pre_attn_scalar or cfg.head_dim
        self.q_scale = math.sqrt(cfg.head_dim / scalar)

    def project(self, x: torch.Tensor, rope: dict[bool, tuple[torch.Tensor, torch.Tensor]]):
        """x [T, hidden] -> q [T, Hq, D], k, v [T, Hkv, D]: normed, turned and scaled as the
        backends take them."""
        T = x.shape[0]
        cos, sin = rope[self.local]
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q, k, v = self.qkv_proj(x).split([q_size, kv_size, kv_size], dim=-1)
        q = self.q_norm(q.view(T, self.num_heads, self.head_dim))
        k = self.k_norm(k.view(T, self.num_kv_heads, self.head_dim))
        if self.use_rope:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.q_scale != 1.0:
            q = q * self.q_scale
        return q, k, v.view(T, self.num_kv_heads, self.head_dim)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.gelu = cfg.gemma  # GeGLU with tanh-approximated GELU

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        act = F.gelu(gate, approximate="tanh") if self.gelu else F.silu(gate)
        return self.down_proj(act * up)


class DecoderLayer(nn.Module):
    """Pre-norm residual blocks; Gemma adds a norm after attention and one around the MLP (its
    post_attention_layernorm normalises the attention output, Llama's the MLP input)."""

    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.gemma = cfg.gemma
        self.input_layernorm = make_norm(cfg, cfg.hidden_size)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = make_norm(cfg, cfg.hidden_size)
        if cfg.gemma:
            self.pre_feedforward_layernorm = make_norm(cfg, cfg.hidden_size)
            self.post_feedforward_layernorm = make_norm(cfg, cfg.hidden_size)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, rope, ctx, attention: Attend, piece: int) -> None:
        """x [T, hidden], updated in place. The token-wise parts (norms, projections, MLP) run
        over at most `piece` tokens at a time, attention once over all T: a long prompt's layer
        attends in one causal call (the fastest kernel, no cached prefix re-read per chunk),
        while the MLP's workspace stays that of `piece` tokens."""
        T, attn = x.shape[0], self.self_attn
        spans = [slice(s, min(s + piece, T)) for s in range(0, T, piece)]
        if len(spans) == 1:
            q, k, v = attn.project(self.input_layernorm(x), rope)
        else:
            q = x.new_empty(T, attn.num_heads, attn.head_dim)
            k = x.new_empty(T, attn.num_kv_heads, attn.head_dim)
            v = torch.empty_like(k)
            for s in spans:
                q[s], k[s], v[s] = attn.project(self.input_layernorm(x[s]),
                                                {w: (c[s], n[s]) for w, (c, n) in rope.items()})
        o = attention(attn.layer_idx, q, k, v, ctx).reshape(T, -1)  # [T, Hq * D]
        del q, k, v
        for s in spans:
            a = attn.o_proj(o[s])
            if self.gemma:
                x[s] += self.post_attention_layernorm(a)
                m = self.mlp(self.pre_feedforward_layernorm(x[s]))
                x[s] += self.post_feedforward_layernorm(m)
            else:
                x[s] += a
                x[s] += self.mlp(self.post_attention_layernorm(x[s]))


# HF parameter names -> (our parameter, shard index or None) for the fused projections.
PACKED = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
           "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        # zeros, not Embedding's normal_ init: on the meta device (the loader's build) normal_ runs
        # a Python decomposition that imports torch._dynamo, 1.9 s of every start
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size,
                                         _weight=torch.zeros(cfg.vocab_size, cfg.hidden_size))
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = make_norm(cfg, cfg.hidden_size)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.tie_weights()
        local = rope_inv_freq(cfg, local=True) if cfg.local_rope_theta is not None else None
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)
        self.register_buffer("local_inv_freq", local, persistent=False)

    def init_rope(self, device: torch.device, long: bool = False) -> None:
        """RoPE frequencies in fp32 on device (after a meta-device build): global, and the
        window layers' own when they have a base of their own. long: LongRoPE's long factors
        (the engine asks for them when its context can pass the original length)."""
        self.inv_freq = rope_inv_freq(self.config, long=long).to(device)
        if self.local_inv_freq is not None:
            self.local_inv_freq = rope_inv_freq(self.config, local=True).to(device)

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: Any,
                attention: Attend, piece: int | None = None) -> torch.Tensor:
        """input_ids, positions: [T] -> final hidden states [T, hidden]. Layer by layer over all
        T tokens, the token-wise work in pieces of at most `piece` tokens (DecoderLayer)."""
        T = input_ids.shape[0]
        piece = piece or T
        x = self.embed_tokens(input_ids)
        if self.config.gemma:  # the scale rounded to the embedding's dtype, as transformers
            x = x * torch.tensor(self.config.hidden_size ** 0.5, dtype=x.dtype)
        s = self.config.rope_scaling  # LongRoPE scales cos and sin too
        scale = s.attention_factor if s is not None else 1.0
        rope = {False: self._cos_sin(positions, self.inv_freq, x.dtype, scale)}
        rope[True] = (rope[False] if self.local_inv_freq is None
                      else self._cos_sin(positions, self.local_inv_freq, x.dtype))
        for layer in self.layers:
            layer(x, rope, ctx, attention, piece)
        for start in range(0, T, piece):  # in place: no [T, hidden] fp32 copy at once
            x[start:start + piece] = self.norm(x[start:start + piece])
        return x

    @staticmethod
    def _cos_sin(positions, inv_freq, dtype, scale: float = 1.0):
        freqs = positions[:, None].float() * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]
        return (emb.cos() * scale).to(dtype), (emb.sin() * scale).to(dtype)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden).float()
        cap = self.config.final_logit_softcap
        return torch.tanh(logits / cap) * cap if cap else logits

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]], device: torch.device,
                     compact: Compact | None = None) -> None:
        """Copy HF-named tensors in, fusing q/k/v and gate/up; every parameter must be set.
        Parameters still on the meta device are allocated on `device` at their first write.
        compact(name, weight, bias): a module to replace each linear layer (and the embedding)
        with as soon as its weight is whole, so that only one dense weight is held at a time."""
        cfg, params = self.config, dict(self.named_parameters())
        kv = cfg.num_kv_heads * cfg.head_dim
        shard_rows = {"qkv_proj": [cfg.num_heads * cfg.head_dim, kv, kv],
                      "gate_up_proj": [cfg.intermediate_size] * 2}
        expected = {(n, s) for n in params for s in self._shards(n, shard_rows)}
        seen: set[tuple[str, int | None]] = set()
        for name, tensor in weights:
            if name == "rope_freqs":  # llama.cpp's llama3 frequency factors
                self.inv_freq = self.inv_freq / tensor.to(self.inv_freq)
                continue
            name = name.removeprefix("model.")
            parts = name.split(".")
            shard = None
            if len(parts) >= 2 and parts[-2] in PACKED:
                parts[-2], shard = PACKED[parts[-2]]
            target = ".".join(parts)
            if target == "lm_head.weight" and cfg.tie_word_embeddings:
                continue
            if target not in params:
                continue  # e.g. rotary_emb.inv_freq in old checkpoints
            param = params[target] = self._allocated(target, params[target], device,
                                                     tensor if shard is None else None)
            if shard is None:  # whole (Phi-3 ships qkv_proj and gate_up_proj fused)
                dest = param
                seen.update((target, i) for i in self._shards(target, shard_rows))
            else:
                rows = shard_rows[parts[-2]]
                dest = param.narrow(0, sum(rows[:shard]), rows[shard])
            if dest.shape != tensor.shape:
                raise ModelLoadError(
                    f"tensor {name} has shape {tuple(tensor.shape)}, expected {tuple(dest.shape)}"
                )
            if dest is not tensor:
                dest.copy_(tensor)
            seen.add((target, shard))
            owner, _, attr = target.rpartition(".")
            if (compact is not None and attr == "weight" and owner != "embed_tokens"
                    and isinstance(self.get_submodule(owner), nn.Linear)
                    and all((target, i) in seen for i in self._shards(target, shard_rows))):
                self.set_submodule(owner, compact(target, param, self.get_submodule(owner).bias))
                del params[target]  # the dense weight goes with the last reference to it
        if cfg.tie_word_embeddings:
            expected.discard(("lm_head.weight", None))
        missing = sorted(n for n, _ in expected - seen)
        if missing:
            raise ModelLoadError(f"checkpoint lacks {len(missing)} tensors, e.g. {missing[0]}")
        self.tie_weights()  # the embedding was allocated after tie_weights shared it
        if compact is not None:  # the embedding reads its rows from a compact copy
            table = self.embed_tokens.weight
            head = compact("embed_tokens.weight", table, None)
            if cfg.tie_word_embeddings:
                self.lm_head = head
            self.embed_tokens = QuantEmbedding(head, table.dtype)

    def _allocated(self, target: str, param: nn.Parameter, device: torch.device,
                   whole: torch.Tensor | None) -> nn.Parameter:
        """param itself, or where it is still on the meta device a new one on `device` put in
        its place: `whole` itself where it fits exactly (no copy of a large embedding), else
        uninitialised storage that the caller writes."""
        if not param.is_meta:
            return param
        owner, _, attr = target.rpartition(".")
        fits = (whole is not None and whole.shape == param.shape and whole.dtype == param.dtype
                and whole.device == device and whole.is_contiguous())
        data = whole if fits else torch.empty(param.shape, dtype=param.dtype, device=device)
        real = nn.Parameter(data, requires_grad=False)
        self.get_submodule(owner)._parameters[attr] = real
        return real

    @staticmethod
    def _shards(name: str, shard_rows: dict[str, list[int]]) -> list[int | None]:
        packed = name.split(".")[-2] if name.count(".") else ""
        return list(range(len(shard_rows[packed]))) if packed in shard_rows else [None]
