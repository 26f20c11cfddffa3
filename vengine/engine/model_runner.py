"""Runs the model over sequences: chunked prefill of one sequence, batched decode of many.

It turns each sequence's page list into the flat slots and block tables of a StepContext; the
layers' attention backends do the rest, told explicitly where a step begins and ends. On a GPU
the decode step is captured in CUDA graphs, one per (batch size, block-table width bucket): a
step is then one graph launch instead of ~30 kernel launches per layer, and its inputs are the
only host-to-device traffic.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vengine.attention.base import LayerBackends
from vengine.attention.context import StepContext
from vengine.engine.sequence import Sequence
from vengine.kernels.common import accuracy_targets
from vengine.models.llama import LlamaForCausalLM
from vengine.offload.kv_pool import KVPool


def width_bucket(pages: int) -> int:
    """Round a block-table width up to 8 steps per octave (<= 12.5% padding), so that a
    generation to 128K tokens captures a few dozen graphs, not one per page."""
    step = 1 << max(0, pages.bit_length() - 4)
    return -(-pages // step) * step


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    inputs: dict[str, torch.Tensor]  # static input buffers, refilled before each replay
    logits: torch.Tensor
    step_stats: tuple  # the backends' per-step statistics, written by the graph


class ModelRunner:
    def __init__(
        self,
        model: LlamaForCausalLM,
        pool: KVPool,
        backends: LayerBackends,
        device: torch.device,
        prefill_chunk: int = 2048,
        prefill_piece: int = 2048,
        cuda_graphs: bool = True,
    ) -> None:
        self.model, self.pool, self.backends, self.device = model, pool, backends, device
        self.prefill_chunk, self.prefill_piece = prefill_chunk, min(prefill_piece, prefill_chunk)
        self.page_size = pool.page_size
        self.use_graphs = cuda_graphs and device.type == "cuda" and backends.graphable
        self.graphs: dict[tuple[int, int], _Graph] = {}
        self.graph_error: str | None = None  # why capture failed (decode then stays eager)
        self._graph_pool = None

    def _slots(self, block_table: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        P = self.page_size
        return block_table[positions // P] * P + positions % P

    @torch.inference_mode()
    def prefill(self, seq: Sequence, all_logits: bool = False) -> torch.Tensor:
        """Cache every not-yet-cached token of seq; logits of the last one [V] (or all: [T, V]).

        A forward per chunk of prefill_chunk tokens (by default the whole prompt), layer by
        layer: each layer attends over the chunk and its cached prefix in one causal call and
        streams the chunk's K/V to the pool once; norms, projections and MLP run in pieces of
        prefill_piece tokens. Small chunks made every chunk re-read the cached prefix over PCIe
        and attend with a slower kernel than one causal square (docs/user_path.md).
        """
        ids = seq.all_ids
        self.pool.allocator.grow(seq.block_table, len(ids))
        table = torch.tensor(seq.block_table, device=self.device)
        self.backends.begin_step([seq], is_prefill=True)
        outputs = []
        for start in range(seq.num_cached, len(ids), self.prefill_chunk):
            end = min(start + self.prefill_chunk, len(ids))
            positions = torch.arange(start, end, device=self.device)
            ctx = StepContext(
                is_prefill=True,
                slots=self._slots(table, positions),
                block_tables=table[None],
                context_lens=torch.tensor([end], device=self.device),
                seq_ids=(seq.seq_id,),
                cached_len=start,
            )
            input_ids = torch.tensor(ids[start:end], device=self.device)
            hidden = self.model(input_ids, positions, ctx, self.backends, self.prefill_piece)
            if all_logits:
                outputs += [self.model.compute_logits(hidden[i:i + self.prefill_piece])
                            for i in range(0, len(hidden), self.prefill_piece)]
            seq.num_cached = end
        return torch.cat(outputs) if all_logits else self.model.compute_logits(hidden[-1:])[0]

    @torch.inference_mode()
    def decode(self, seqs: list[Sequence]) -> torch.Tensor:
        """One token for each sequence: feeds each one's last token; logits [B, V]."""
        for seq in seqs:
            self.pool.allocator.grow(seq.block_table, seq.num_tokens)
        self.pool.pin_all()  # a graph replay's stores pass no host code that could pin
        width = max(len(s.block_table) for s in seqs)
        if self.use_graphs:
            width = width_bucket(width)
        tables = torch.tensor([s.block_table + [0] * (width - len(s.block_table)) for s in seqs])
        positions = torch.tensor([s.num_cached for s in seqs])
        slot_pages = tables.gather(1, (positions // self.page_size)[:, None])[:, 0]
        inputs = {
            "input_ids": torch.tensor([s.all_ids[-1] for s in seqs]),
            "positions": positions,
            "tables": tables,
            "slots": slot_pages * self.page_size + positions % self.page_size,
            "targets": accuracy_targets([(s.params.epsilon, s.params.delta) for s in seqs]),
        }
        seq_ids = tuple(s.seq_id for s in seqs)
        self.pool.wait_writes()  # prefill's side-stream writes land before decode reads them
        self.backends.begin_step(seqs, is_prefill=False)
        key = (len(seqs), width)
        entry = self.graphs.get(key)
        if self.device.type == "cuda":  # staged in pinned memory: the copies do not block
            inputs = {name: t.pin_memory() for name, t in inputs.items()}
        if entry is not None:
            for name, t in inputs.items():
                entry.inputs[name].copy_(t, non_blocking=True)
            entry.graph.replay()
            logits, stats = entry.logits.clone(), entry.step_stats
        else:
            dev_inputs = {name: t.to(self.device, non_blocking=True) for name, t in inputs.items()}
            logits, stats = self._forward(dev_inputs, seq_ids)
        self.backends.end_step(seq_ids, stats)
        if entry is None and self.use_graphs and self.graph_error is None:
            self._capture(key, dev_inputs, seq_ids)
        for seq in seqs:
            seq.num_cached += 1
        return logits

    def _forward(self, inputs: dict[str, torch.Tensor], seq_ids: tuple[int, ...]):
        """The decode step on device tensors -> (logits [B, V], the backends' step statistics)."""
        ctx = StepContext(
            is_prefill=False,
            slots=inputs["slots"],
            block_tables=inputs["tables"],
            context_lens=inputs["positions"] + 1,
            seq_ids=seq_ids,
            targets=inputs["targets"],
        )
        hidden = self.model(inputs["input_ids"], inputs["positions"], ctx, self.backends)
        return self.model.compute_logits(hidden), self.backends.step_stats()

    def _capture(self, key, inputs: dict[str, torch.Tensor], seq_ids) -> None:
        """Record the decode step for this (batch, width) just run eagerly (so every kernel is
        compiled and warm). Capture only records: it writes no KV and draws no samples."""
        graph = torch.cuda.CUDAGraph()
        try:
            for generator in self.backends.generators:
                graph.register_generator_state(generator)
            if self._graph_pool is None:
                self._graph_pool = torch.cuda.graph_pool_handle()
            with torch.cuda.graph(graph, pool=self._graph_pool):
                logits, stats = self._forward(inputs, seq_ids)
        except Exception as e:  # an op that cannot be captured: stay eager, say why in /stats
            self.graph_error = f"{type(e).__name__}: {e}"
            self.use_graphs = False
            self.backends.step_stats()  # drop what the failed capture recorded
            torch.cuda.synchronize()
            return
        self.graphs[key] = _Graph(graph, inputs, logits, stats)

    def truncate(self, seq: Sequence, num_tokens: int) -> None:
        """Keep only the first num_tokens cached tokens of seq (a chat turn rewrote the rest), or
        fewer where the sliding-window rings cannot rewind that far."""
        seq.num_cached = self.backends.kept(seq.seq_id, seq.num_cached,
                                            min(seq.num_cached, num_tokens))
        self.pool.allocator.shrink(seq.block_table, seq.num_cached)

    def release(self, seq: Sequence) -> None:
        """Give the sequence's pages and any backend state back at once."""
        self.pool.allocator.free(seq.block_table)
        self.backends.free(seq.seq_id)
        seq.num_cached = 0
