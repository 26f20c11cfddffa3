"""Real attention inputs for tests and benchmarks: Q/K/V captured from a model's prefill, and a
deterministic long text (Python standard-library docstrings) that needs no download."""

from __future__ import annotations

import importlib
import inspect
import math
import warnings
from dataclasses import dataclass

import torch

from vengine.attention.context import StepContext
from vengine.attention.full import causal_attention
from vengine.attention.window import window_causal_attention
from vengine.kernels.common import encode_pages, paged_rows, soft_cap

_DOC_MODULES = ("argparse", "collections", "json", "email", "typing", "logging", "asyncio",
                "functools", "itertools", "pathlib", "subprocess", "threading", "unittest",
                "datetime", "decimal", "fractions", "statistics", "random", "re", "string",
                "textwrap", "shutil", "tempfile", "csv", "sqlite3", "zipfile", "tarfile", "heapq",
                "bisect", "contextlib", "dataclasses", "enum", "inspect", "pickle", "socket")


def corpus_text() -> str:
    """Some 60K tokens of English prose and code from standard-library docstrings."""
    parts = []
    for name in _DOC_MODULES:
        with warnings.catch_warnings():  # typing.io and friends warn on attribute access
            warnings.simplefilter("ignore", DeprecationWarning)
            parts.extend(_docs(importlib.import_module(name), name))
    return "\n\n".join(p for p in parts if p)


def _docs(module, name: str) -> list[str]:
    parts = [inspect.getdoc(module) or ""]
    for _, obj in sorted(vars(module).items()):
        owner = getattr(obj, "__module__", None)  # None where a library wrapped it (Ray)
        if (inspect.isclass(obj) or inspect.isfunction(obj)) and str(owner).startswith(name):
            parts.append(inspect.getdoc(obj) or "")
    return parts


@dataclass
class LayerActivations:
    q: torch.Tensor  # [Tq, Hq, D] queries of the last Tq positions
    k: torch.Tensor  # [T, Hkv, D] keys after RoPE, all positions
    v: torch.Tensor  # [T, Hkv, D]


class _Capture:
    """The model's attention, exact; records the global layers (a sliding-window layer attends
    its window and is never sparse, so it has nothing to calibrate)."""

    def __init__(self, keep_queries: int, model_config) -> None:
        self.keep, self.layers, self.config = keep_queries, [], model_config

    def __call__(self, layer, q, k, v, ctx):
        window, cap = self.config.window(layer), self.config.attn_softcap or 0.0
        if window:
            return window_causal_attention(q, k, v, window, 0, cap)
        self.layers.append(LayerActivations(q[-self.keep :].float(), k.float(), v.float()))
        return causal_attention(q, k, v, 0, cap)


@torch.inference_mode()
def capture(model, token_ids: list[int], keep_queries: int = 16) -> list[LayerActivations]:
    """Run one exact prefill of token_ids and keep every global layer's K, V and last
    queries."""
    cap = _Capture(keep_queries, model.config)
    dev = next(model.parameters()).device
    ids = torch.tensor(token_ids, device=dev)
    ctx = StepContext(True, ids, ids[None], ids[-1:], (0,))
    model(ids, torch.arange(len(token_ids), device=dev), ctx, cap)
    return cap.layers


@dataclass
class DecodeProblem:
    """Layer activations laid out as a paged pool: B queries at the last B positions."""

    q: torch.Tensor  # [B, Hq, D]
    k_pool: torch.Tensor  # [pages, Hkv, P, D]
    v_pool: torch.Tensor
    block_tables: torch.Tensor  # [B, pages]
    context_lens: torch.Tensor  # [B]
    codes: tuple[torch.Tensor, torch.Tensor]  # the keys' codes (kernels.base.KeyCodes)
    softcap: float = 0.0  # the model's cap on scores (common.soft_cap; Gemma 2)

    def rows(self, pool: torch.Tensor) -> torch.Tensor:
        """A pool's rows of each query's sequence: [B, Hkv, S, ...]."""
        return paged_rows(pool, self.block_tables)

    def exact(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact scores [B, Hq, S] (-inf past each context) and outputs [B, Hq, D]."""
        B, Hq, D = self.q.shape
        k, v = self.rows(self.k_pool), self.rows(self.v_pool)
        Hkv, S = k.shape[1], k.shape[2]
        G = Hq // Hkv
        s = torch.einsum("bhgd,bhsd->bhgs", self.q.view(B, Hkv, G, D), k) / math.sqrt(D)
        s = soft_cap(s, self.softcap)
        live = torch.arange(S, device=k.device) < self.context_lens[:, None]
        s = s.masked_fill(~live[:, None, None], float("-inf"))
        out = torch.einsum("bhgs,bhsd->bhgd", s.softmax(-1), v)
        return s.reshape(B, Hq, S), out.reshape(B, Hq, D)


def to_pages(x: torch.Tensor, page_size: int = 64) -> torch.Tensor:
    """Rows [T, Hkv, D] as a pool [pages, Hkv, page_size, D], the last page zero padded."""
    T, Hkv, D = x.shape
    pages = -(-T // page_size)
    x = torch.cat([x, x.new_zeros(pages * page_size - T, Hkv, D)])
    return x.view(pages, page_size, Hkv, D).transpose(1, 2).contiguous()


def decode_problem(act: LayerActivations, key_bits: int = 3, page_size: int = 64,
                   softcap: float = 0.0) -> DecodeProblem:
    """Queries at the last B positions, each attending over the keys up to its own position."""
    T = act.k.shape[0]
    B = act.q.shape[0]
    k_pool = to_pages(act.k, page_size)
    pages = k_pool.shape[0]
    return DecodeProblem(
        q=act.q,
        k_pool=k_pool,
        v_pool=to_pages(act.v, page_size),
        block_tables=torch.arange(pages, device=act.k.device)[None].expand(B, pages).contiguous(),
        context_lens=torch.arange(T - B + 1, T + 1, device=act.k.device),
        codes=encode_pages(k_pool, key_bits),
        softcap=softcap,
    )
