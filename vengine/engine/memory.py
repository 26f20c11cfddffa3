"""The memory plan: how many KV pages and how long a prefill chunk, from the host and GPU budgets,
decided before anything large is allocated. What does not fit is one line that names the flag
to change, instead of an out-of-memory error halfway through a 128K prefill.

On a GPU the plan holds the weights (measured after the load), and per KV page what stays on the
GPU: the whole page with the KV there, the page's key codes with vAttention's KV in host memory,
nothing for exact attention over host KV. Beside them: the resident sink and window pages, the
prefill's workspace (one layer's activations over the whole prompt, and the MLP's over one
chunk of it) and the decode step's.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import torch

from vengine.attention.config import VAttention
from vengine.attention.vattention import RESIDENT_SEQUENCES
from vengine.errors import ConfigError
from vengine.models.config import ModelConfig

HOST_FRACTION = 0.75  # the default host KV cap: this share of the RAM available at start
GPU_MARGIN = 1 << 30  # CUDA graphs, the caching allocator's slack, sampling buffers (at most
# an eighth of the budget)
MIN_PREFILL_CHUNK = 256
PREFILL_PIECE = {"cuda": 8192, "cpu": 2048}  # tokens the MLP runs over at once (GPU GEMMs are
# at full speed from a few thousand rows); the plan halves it to PIECE_FLOOR before the chunk
PIECE_FLOOR = 2048


@dataclass(frozen=True)
class GpuState:
    """What a KV page and the attention keep on the GPU beside the weights."""

    page_bytes: int  # per KV page: the page itself, its key codes, or 0
    resident_bytes: int  # fixed: GPU copies of sink and window pages
    decode_bytes_per_row: int  # the decode step's workspace per context row of the batch


@dataclass(frozen=True)
class MemoryPlan:
    num_pages: int
    prefill_chunk: int  # prompt tokens per prefill forward
    prefill_piece: int  # tokens the token-wise work of a forward runs over at once
    gpu: dict[str, int]  # planned GPU bytes by part; empty on CPU

    @property
    def gpu_total(self) -> int:
        return sum(self.gpu.values())


def available_memory(device: torch.device) -> int:
    """Free GPU memory, or the RAM the kernel says is available (MemAvailable: free memory and
    the page cache it can drop)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            kib = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:"))
        return kib * 1024
    except (OSError, StopIteration, ValueError):
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def code_page_bytes(mc: ModelConfig, page_size: int, bits: int) -> int:
    """One page's key codes and per-channel scales (offload.kv_pool.KeyCodePool)."""
    return len(mc.global_layers) * mc.num_kv_heads * (page_size * bits * mc.head_dim // 8
                                              + 2 * mc.head_dim * 2)


def prefill_bytes(mc: ModelConfig, dtype_bytes: int, chunk: int, piece: int,
                  context: int) -> int:
    """GPU workspace of a prefill forward (ModelRunner.prefill): per token of the `chunk`, the
    hidden state, q, k, v and the attention output of the layer being run (sliding-window
    layers pad copies of q, k, v and their output besides); per token of a `piece`, the fused
    q/k/v and gate/up outputs, the activation product, residual and norm copies; and the cached
    prefix's K/V gathered when the chunk follows one (a later chunk, or a chat turn)."""
    q, kv = mc.num_heads * mc.head_dim, mc.num_kv_heads * mc.head_dim
    per_chunk_token = mc.hidden_size + 2 * q + 2 * kv + (2 * q + 2 * kv if mc.layer_windows else 0)
    per_piece_token = 4 * mc.intermediate_size + 6 * mc.hidden_size + 3 * (q + 2 * kv)
    return dtype_bytes * (chunk * per_chunk_token + piece * per_piece_token
                          + context * 2 * kv) + 8 * mc.vocab_size


def runtime_config(mc: ModelConfig, max_context: int) -> ModelConfig:
    """The model's config as the engine sizes it: a sliding window at least as long as the
    context never binds, so such layers are global (their KV in the pool). A model whose every
    layer keeps a binding window (Mistral's sliding_window) pools nothing: all its KV is rings."""
    if not mc.layer_windows:
        return mc
    windows = tuple(w if w < max_context else 0 for w in mc.layer_windows)
    if len(set(windows) - {0}) > 1:
        raise ConfigError("max_context: sliding-window layers of different windows are not "
                          "supported yet", field="max_context")
    return dataclasses.replace(mc, layer_windows=windows if any(windows) else None)


def gpu_state(mc: ModelConfig, attention, dtype_bytes: int, page_size: int,
              kv_on_host: bool, ring_bytes: int = 0, kv_fp8: bool = False,
              max_context: int = 0) -> GpuState:
    """What the attention (an EngineConfig.attention: a spec or a tuple of per-layer specs)
    keeps on the GPU per page and per decoded row; ring_bytes: the sliding-window layers';
    kv_fp8: rows of 1 byte per element, and a bfloat16 scale per row on the GPU; max_context
    sizes a row cache (VAttention.row_cache)."""
    specs = attention if isinstance(attention, tuple) else (attention,)
    sparse = next((s for s in specs if isinstance(s, VAttention)), None)
    kv_page = page_size * mc.kv_bytes_per_token(1 if kv_fp8 else dtype_bytes)
    codes = code_page_bytes(mc, page_size, sparse.key_bits) if sparse else 0
    codes += page_size * mc.kv_bytes_per_token(2) // mc.head_dim if kv_fp8 else 0
    gather_row = 2 * mc.num_kv_heads * mc.head_dim * dtype_bytes + 4 * mc.num_heads
    if sparse is None or any(not isinstance(s, VAttention) for s in specs):
        per_row = gather_row  # exact decode (or a plug-in) gathers every row
    else:
        per_row = 8 * 4 * mc.num_heads  # a few fp32 [B, Hq, n] score and weight tensors
    resident = 0
    if sparse and kv_on_host:
        per_seq = -(-sparse.sink // page_size) + -(-sparse.window // page_size) + 1
        resident = RESIDENT_SEQUENCES * per_seq * kv_page
    if sparse:  # the row cache, wherever the KV is (the backend allocates it wherever asked):
        # per sequence, layer and KV head, two copies of K and V and a position of each exact
        # row (offload.row_cache.RowCache)
        rows = sparse.row_cache * len(mc.global_layers) * sparse.exact_rows(max_context, page_size)
        row_bytes = mc.num_kv_heads * mc.head_dim * (1 if kv_fp8 else dtype_bytes)
        resident += rows * (4 * row_bytes + 4 * mc.num_kv_heads)
    return GpuState(codes + (0 if kv_on_host else kv_page), resident + ring_bytes, per_row)


def plan_memory(mc: ModelConfig, *, dtype_bytes: int, page_size: int, max_context: int,
                max_batch: int, host_mem: int | None, host_available: int, prefill_chunk: int,
                prefill_piece: int, kv_on_host: bool = True, gpu_mem: int | None = None,
                weights_bytes: int = 0, state: GpuState | None = None,
                kv_bytes: int | None = None) -> MemoryPlan:
    """Pages for max_batch full contexts, capped by --host-mem (default HOST_FRACTION of the
    available RAM) and, on a GPU (gpu_mem given), by what each page keeps there; the prefill
    piece halves to PIECE_FLOOR, then the chunk (one forward's prompt tokens), until one
    context's pages, the prefill's workspace and the decode step's fit.
    Without --host-mem, a RAM that cannot hold one full context is an error at start; a cap the
    user set may be smaller (requests that outgrow it fail alone, HostMemoryError). kv_bytes:
    the pool's bytes per element (1 for fp8; default dtype_bytes)."""
    kv_page = page_size * mc.kv_bytes_per_token(kv_bytes or dtype_bytes)
    one = -(-(max_context + page_size) // page_size)  # pages of one full context
    if host_mem is not None and kv_page:
        pages, cap = host_mem // kv_page, f"host_mem {gib(host_mem)}"
    elif not kv_on_host or not kv_page:  # KV on the device, or none pooled (all windows)
        pages, cap = max_batch * one, ""
    else:
        limit = int(HOST_FRACTION * host_available)
        pages, cap = min(max_batch * one, limit // kv_page), (
            f"host_mem (default {HOST_FRACTION:.0%} of the {gib(host_available)} of RAM "
            f"available, {gib(limit)})")
    if pages < 1 or (pages < one and host_mem is None):  # a cap the user set may be small
        raise ConfigError(
            f"{cap} holds {pages * page_size} tokens of KV; one {max_context}-token context "
            f"needs {gib(one * kv_page)}: raise --host-mem or lower --ctx", field="host_mem")
    chunk = min(prefill_chunk, max_context)
    piece = min(prefill_piece, chunk)
    if gpu_mem is None or state is None:
        return MemoryPlan(pages, chunk, piece, {})

    margin = min(GPU_MARGIN, gpu_mem // 8)
    room = gpu_mem - weights_bytes - margin - state.resident_bytes
    where = f"gpu_mem {gib(gpu_mem)} (weights {gib(weights_bytes)})"
    if room <= 0:
        raise ConfigError(f"{where} leaves no room for the KV state and workspaces: raise "
                          "--gpu-mem or use a smaller model", field="gpu_mem")
    rows = min(max_batch * max_context, pages * page_size)

    def prefill(chunk: int, piece: int) -> int:
        return prefill_bytes(mc, dtype_bytes, chunk, piece, max_context)

    def fixed(chunk: int, piece: int, num_pages: int) -> int:
        return (prefill(chunk, piece) + state.decode_bytes_per_row
                * min(rows, num_pages * page_size) + state.page_bytes * num_pages)

    one = min(one, pages)
    while fixed(chunk, piece, one) > room:
        if piece > PIECE_FLOOR:
            piece //= 2
        elif chunk > MIN_PREFILL_CHUNK:
            chunk = max(chunk // 2, MIN_PREFILL_CHUNK)
            piece = min(piece, chunk)
        else:
            break
    if fixed(chunk, piece, one) > room:
        what = ("its KV" if state.page_bytes == kv_page else "its key codes"
                if state.page_bytes else "the workspace of its attention")
        hint = ("use --attention vattention (KV in host memory) or lower --ctx"
                if state.page_bytes == kv_page else "raise --gpu-mem or lower --ctx")
        raise ConfigError(
            f"{where}: one {max_context}-token context does not fit, {what} and a "
            f"{chunk}-token prefill need {gib(fixed(chunk, piece, one))} and {gib(room)} is "
            f"left: {hint}", field="gpu_mem")
    if state.page_bytes:
        per_page = state.page_bytes + state.decode_bytes_per_row * page_size
        pages = min(pages, (room - prefill(chunk, piece)) // per_page)
    gpu = {"weights": weights_bytes, "kv pages": state.page_bytes * pages,
           "resident pages": state.resident_bytes, "prefill": prefill(chunk, piece),
           "decode step": state.decode_bytes_per_row * min(rows, pages * page_size),
           "margin": margin}
    return MemoryPlan(pages, chunk, piece, gpu)
