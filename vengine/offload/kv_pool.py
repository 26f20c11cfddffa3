"""Paged KV pool: every layer's K and V in pages of `page_size` tokens, bounded by a byte budget.

Layout [layers, pages, kv_heads, page_size, head_dim]: the rows of one (layer, KV head) inside a page
are contiguous, so gathers of one head's rows read long runs. The pool lives in pinned host memory
when a GPU will read it, in ordinary memory on CPU-only boxes, or on the GPU for the resident
full-attention baseline. Page bookkeeping is plain Python (PageAllocator).

A pinned pool is an anonymous mmap whose slabs (SLAB_BYTES of K + V) are page-locked with
cudaHostRegister once the allocator hands their pages out, so host memory tracks the KV in use,
not the budget. Each slab of each layer is its own registration, made just before that layer's
first write (`writing`), or for every layer before a decode step (`pin_all`): a 128K prefill's
16 GiB are pinned layer by layer while the GPU runs the layers before, instead of ~10 s at
its start (cudaHostRegister faults fresh pages in at 1.3-2.7 GB/s). A DMA copy of the host
tensors (k[...].copy_) must stay inside one slab; kernels reading through the views need not.
The GPU addresses the pool through UVA views (k_view, v_view): kernels read the rows
they need straight over PCIe, and new rows are written by GPU stores, so no step waits for the
host. Rows are written by the kernels' store_rows (prefill and decode alike); long writes
(prefill) run on a side stream (`writing`), overlapping the next layer's compute.

With fp8, rows are float8 e4m3 (half the host bytes and PCIe traffic of 16-bit rows), each with
a bfloat16 scale that stays on the compute device (k_scale, v_scale; kernels.common.Fp8Rows).
"""

from __future__ import annotations

import contextlib
import heapq
import math
import mmap
import re
import weakref
from collections.abc import Callable, Iterator

import torch

from vengine.errors import ConfigError, HostMemoryError
from vengine.kernels.common import Fp8Rows, paged_rows
from vengine.offload.uva import pin_range, uva_view, unpin_range

_SIDE_STREAM_ROWS = 1024  # writes of at least this many tokens go on the side stream
SLAB_BYTES = 1 << 30  # a pinned pool is pinned in slabs of about this much K + V, as pages are used

_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 10**3, "kib": 2**10, "m": 2**20, "mb": 10**6,
          "mib": 2**20, "g": 2**30, "gb": 10**9, "gib": 2**30, "t": 2**40, "tb": 10**12,
          "tib": 2**40}


def parse_bytes(value: str | int, flag: str = "host_mem") -> int:
    """'64GiB', '500MB', '2g' or an int -> bytes."""
    if isinstance(value, int) and not isinstance(value, bool):
        n = value
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
        if not m or m.group(2).lower() not in _UNITS:
            raise ConfigError(f"{flag}: cannot read '{value}' as a size (e.g. 64GiB, 500MB)")
        n = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if n <= 0:
        raise ConfigError(f"{flag}: must be positive, got {value}")
    return n


class PageAllocator:
    """Free pages, lowest id first (so that reuse after release stays inside the pinned slabs);
    raises HostMemoryError before any state changes when pages run out. on_grow(n) is told when
    pages at or above n's old value are first handed out (KVPool pins slabs there)."""

    def __init__(self, num_pages: int, page_size: int, budget_bytes: int,
                 on_grow: Callable[[int], None] | None = None) -> None:
        self.page_size, self.budget_bytes = page_size, budget_bytes
        self.page_bytes = budget_bytes // max(num_pages, 1)
        self.free_pages = list(range(num_pages))  # a heap
        self.high_water = 0  # one past the highest page ever handed out
        self.on_grow = on_grow

    @property
    def num_free(self) -> int:
        return len(self.free_pages)

    def pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)

    def grow(self, block_table: list[int], num_tokens: int) -> None:
        """Extend block_table in place so that it covers num_tokens tokens."""
        need = self.pages_for(num_tokens) - len(block_table)
        if need > len(self.free_pages):
            raise HostMemoryError(
                f"host KV budget of {self.budget_bytes / 2**30:.2f} GiB is exhausted: "
                f"{need} more pages of {self.page_size} tokens asked for, {self.num_free} free "
                "(raise host_mem / --host-mem, or lower the batch size or context)"
            )
        if need <= 0:
            return
        top = 1 + (self.free_pages[0] if need == 1 else max(heapq.nsmallest(need, self.free_pages)))
        if top > self.high_water:  # told first: if pinning fails, no page has been taken
            if self.on_grow is not None:
                self.on_grow(top)
            self.high_water = top
        block_table += [heapq.heappop(self.free_pages) for _ in range(need)]

    def shrink(self, block_table: list[int], num_tokens: int) -> None:
        """Free the pages past the first num_tokens tokens."""
        keep = self.pages_for(num_tokens)
        for page in block_table[keep:]:
            heapq.heappush(self.free_pages, page)
        del block_table[keep:]

    def free(self, block_table: list[int]) -> None:
        self.shrink(block_table, 0)


def lazy_zeros(shape: tuple[int, ...], dtype: torch.dtype, huge: bool = False) -> torch.Tensor:
    """Zeroed CPU memory committed only as it is written: an anonymous mmap. (torch.zeros
    commits the whole budget at once; torch.empty may hand back freed heap memory, NaNs
    included, which made padded decode rows NaN.) huge: ask for transparent 2 MiB pages, which
    cudaHostRegister faults in and pins 1.25-1.4x faster (2.69 against 2.14, 1.85 against 1.34
    GB/s in two runs on the H200 box)."""
    count = math.prod(shape)
    if not count:  # no pooled layers (a model whose every layer keeps a sliding window)
        return torch.zeros(shape, dtype=dtype)
    buffer = mmap.mmap(-1, count * dtype.itemsize)
    if huge and hasattr(mmap, "MADV_HUGEPAGE"):
        buffer.madvise(mmap.MADV_HUGEPAGE)
    return torch.frombuffer(buffer, dtype=dtype, count=count).view(shape)  # keeps buffer alive


class KVPool:
    """K/V storage: k, v are [layers, pages, kv_heads, page_size, head_dim] on `device`;
    k_view, v_view are the same memory as the compute device addresses it (a UVA view when the
    pool is pinned host memory for a GPU, else k and v themselves)."""

    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        page_size: int,
        num_pages: int,
        dtype: torch.dtype,
        device: torch.device,
        pin: bool = False,
        fp8: bool = False,
        compute_device: torch.device | None = None,
        max_context: int | None = None,
    ) -> None:
        if fp8:
            dtype = torch.float8_e4m3fn
        self.page_size, self.device, self.dtype, self.fp8 = page_size, device, dtype, fp8
        page_bytes = 2 * num_layers * num_kv_heads * page_size * head_dim * dtype.itemsize
        if num_pages < 1:
            raise ConfigError(f"host_mem: holds no KV page ({page_bytes} bytes)", field="host_mem")
        shape = (num_layers, num_pages, num_kv_heads, page_size, head_dim)
        # Unwritten slots are read (and masked) by padded gathers, so they must hold finite values
        # (a masked row still enters attention as 0 * value): zeros everywhere. Host memory is an
        # anonymous mmap, committed as it is written (or pinned), never up front.
        if device.type == "cuda":
            self.k = torch.zeros(shape, dtype=dtype, device=device)
            self.v = torch.zeros(shape, dtype=dtype, device=device)
        else:
            self.k, self.v = lazy_zeros(shape, dtype, pin), lazy_zeros(shape, dtype, pin)
        self.num_pages = num_pages
        self.max_context = max_context or num_pages * page_size  # the longest sequence it holds
        self.layer_pinned = [0] * num_layers  # pages [0, n) of each layer are page-locked
        self._pin_goal = 0  # pages [0, goal) are handed out: pinned before they are touched
        self._pinned: list[tuple[int, int]] = []  # (address, bytes) of each registered range
        self.slab_pages = max(1, SLAB_BYTES // page_bytes) if page_bytes else num_pages
        self.allocator = PageAllocator(num_pages, page_size, num_pages * page_bytes,
                                       on_grow=self._want if pin else None)
        if pin:
            weakref.finalize(self, _unpin_all, self._pinned)
            self._want(1)
            self.pin_all()  # the views' base address must be registered memory
            self.k_view, self.v_view = uva_view(self.k), uva_view(self.v)
        else:
            self.k_view, self.v_view = self.k, self.v
        self.side_stream = torch.cuda.Stream() if pin else None
        # FP8: a bfloat16 scale per row, on the compute device (kernels.common.Fp8Rows)
        scale_shape = (num_layers, num_pages, num_kv_heads, page_size) if fp8 else (0,)
        where = compute_device or device
        self.k_scale = torch.zeros(scale_shape, dtype=torch.bfloat16, device=where)
        self.v_scale = torch.zeros(scale_shape, dtype=torch.bfloat16, device=where)

    def k_layer(self, layer: int):
        """One layer's K as the kernels take it: the (UVA) view, or Fp8Rows with its scales."""
        return Fp8Rows(self.k_view[layer], self.k_scale[layer]) if self.fp8 else self.k_view[layer]

    def v_layer(self, layer: int):
        return Fp8Rows(self.v_view[layer], self.v_scale[layer]) if self.fp8 else self.v_view[layer]

    @property
    def pinned_pages(self) -> int:
        """Pages [0, n) page-locked and mapped for the GPU in every layer."""
        return min(self.layer_pinned, default=self._pin_goal)

    @property
    def pinned_bytes(self) -> int:
        return sum(self.layer_pinned) * self.allocator.page_bytes // max(1, len(self.layer_pinned))

    def _want(self, pages: int) -> None:
        """Pages [0, pages) are handed out (PageAllocator.on_grow): each layer pins them, rounded
        up to whole slabs, before its first write (pin_layer) or before a decode step (pin_all)."""
        end = min(self.num_pages, -(-pages // self.slab_pages) * self.slab_pages)
        self._pin_goal = max(self._pin_goal, end)

    def pin_layer(self, layer: int) -> None:
        """Page-lock this layer's K and V up to the pages handed out (cudaHostRegister, on the
        host): kernels then read and write them through the UVA views."""
        start, end = self.layer_pinned[layer], self._pin_goal
        if start >= end:
            return
        for t in (self.k, self.v):
            rows = t[layer, start:end]
            self._pinned.append(pin_range(rows.data_ptr(), rows.nbytes))
        self.layer_pinned[layer] = end

    def pin_all(self) -> None:
        """Every layer pinned up to the pages handed out: before a step whose kernels touch any
        layer without passing `writing` on the host (a CUDA graph replay)."""
        if self.pinned_pages >= self._pin_goal:  # the usual decode step: nothing new
            return
        for layer in range(len(self.layer_pinned)):
            self.pin_layer(layer)

    @contextlib.contextmanager
    def writing(self, layer: int, *tensors: torch.Tensor) -> Iterator[None]:
        """Run a write of these tensors' rows ([T, ...], the row count first) into `layer` (its
        pages pinned first) on the side stream when it is long (a prefill) and the pool is
        pinned host memory, so that the next layer's compute overlaps it; on the current stream
        otherwise."""
        if self.side_stream is not None:
            self.pin_layer(layer)
        if self.side_stream is None or tensors[0].shape[0] < _SIDE_STREAM_ROWS:
            yield
            return
        self.side_stream.wait_stream(torch.cuda.current_stream())  # the rows are ready
        with torch.cuda.stream(self.side_stream):
            yield
        for t in tensors:  # keep their memory from reuse until the side stream is done
            t.record_stream(self.side_stream)

    def wait_writes(self) -> None:
        """Make the current stream wait for side-stream writes (a device-side wait, no sync).
        Not while a CUDA graph is captured: the capture may not wait on a stream outside it, and
        the runner waits before every replay (a decode step's own writes are on its stream)."""
        if self.side_stream is not None and not torch.cuda.is_current_stream_capturing():
            torch.cuda.current_stream().wait_stream(self.side_stream)

    def gather_pages(self, layer: int, block_tables: torch.Tensor, dtype: torch.dtype):
        """block_tables: [B, n] -> K, V: [B, kv_heads, n * page_size, D] in dtype (padding pages
        included), on the compute device."""
        self.wait_writes()
        return (paged_rows(self.k_layer(layer), block_tables, dtype).to(dtype),
                paged_rows(self.v_layer(layer), block_tables, dtype).to(dtype))


class KeyCodePool:
    """Per-token key codes for the predictor, paged like KV: codes [layers, pages, kv_heads,
    page_size, bits * head_dim / 8] uint8 and per-page, per-channel scales [layers, pages,
    kv_heads, 2, head_dim] float16 (kernels.common.encode_pages).

    Small (3 bits per element and 4 bytes per channel and page, 0.109 of the KV's bytes at
    head dim 128 and 16-bit KV), so it stays on the GPU; kernels.store_rows writes a page's codes
    when its last row is written.
    """

    def __init__(self, kv: KVPool, bits: int, device: torch.device) -> None:
        L, pages, H, P, D = kv.k.shape
        if D % 8:
            raise ConfigError(f"vAttention key codes need a head dim divisible by 8, got {D}")
        shapes = ((L, pages, H, P, bits * D // 8), torch.uint8), ((L, pages, H, 2, D), torch.float16)
        if device.type == "cpu":  # committed as pages fill, like the CPU pool
            self.codes, self.scales = (lazy_zeros(s, t) for s, t in shapes)
        else:
            self.codes, self.scales = (torch.zeros(s, dtype=t, device=device) for s, t in shapes)

    def layer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(codes, scales) of one layer: kernels.base.KeyCodes."""
        return self.codes[layer], self.scales[layer]


class ResidentPages:
    """GPU copies of the host pages that hold the running sequences' sink and recent window, so
    that decode reads those rows from GPU memory instead of over PCIe.

    k, v [layers, slots, kv_heads, page_size, head_dim] on the GPU; slot_of [pages] int32 on the
    GPU, the copy's slot of each host page or -1 (the kernels look it up per row and read the host
    page where it is -1). A page's copy is made on the GPU (a device copy through the pool's UVA
    view, no host wait) when a sequence first wants it, and dropped when no running sequence wants
    it; in between, decode's stores write each new row to both. A page wanted by another sequence
    than the one it was copied for (freed and reused) is copied again. Out of slots, a page simply
    stays on the host (read over PCIe): never wrong, only slower.
    """

    def __init__(self, pool: KVPool, slots: int, device: torch.device) -> None:
        L, _, H, P, D = pool.k.shape
        self.pool = pool
        self.k = torch.zeros((L, slots, H, P, D), dtype=pool.dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.slot_of = torch.full((pool.num_pages,), -1, dtype=torch.int32, device=device)
        self.free_slots = list(range(slots - 1, -1, -1))
        self.held: dict[int, tuple[int, int]] = {}  # page -> (slot, the sequence it was copied for)

    def keep(self, wanted: list[tuple[int, int]]) -> None:
        """Make exactly the (page, sequence) pairs in wanted resident, slots allowing."""
        want = dict(wanted)
        for page, (_, seq_id) in list(self.held.items()):
            if want.get(page) != seq_id:
                self._drop(page)
        for page, seq_id in want.items():
            if page not in self.held and self.free_slots:
                slot = self.free_slots.pop()
                self.k[:, slot].copy_(self.pool.k_view[:, page], non_blocking=True)
                self.v[:, slot].copy_(self.pool.v_view[:, page], non_blocking=True)
                self.slot_of[page : page + 1].fill_(slot)  # t[i] = x would copy x from the host
                self.held[page] = (slot, seq_id)

    def drop_sequence(self, seq_id: int) -> None:
        """Forget a sequence's copies (its pages are about to be rewritten on the host only)."""
        for page, (_, owner) in list(self.held.items()):
            if owner == seq_id:
                self._drop(page)

    def _drop(self, page: int) -> None:
        slot, _ = self.held.pop(page)
        self.slot_of[page : page + 1].fill_(-1)
        self.free_slots.append(slot)

    def layer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(slot_of, k, v) of one layer, as the kernels take them."""
        return self.slot_of, self.k[layer], self.v[layer]


def _unpin_all(ranges: list[tuple[int, int]]) -> None:
    """Unregister a pool's pinned ranges before its memory is unmapped."""
    for address, _ in ranges:
        unpin_range(address)
    ranges.clear()
