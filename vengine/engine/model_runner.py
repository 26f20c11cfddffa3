"""Runs the model over sequences: chunked prefill of one sequence, batched decode of many.

It turns each sequence's page list into the flat slots and block tables of a StepContext; the
attention backend does the rest.
"""

from __future__ import annotations

import torch

from vengine.attention.context import StepContext
from vengine.engine.sequence import Sequence
from vengine.models.llama import LlamaForCausalLM
from vengine.offload.kv_pool import KVPool


class ModelRunner:
    def __init__(
        self,
        model: LlamaForCausalLM,
        pool: KVPool,
        backend,
        device: torch.device,
        prefill_chunk: int = 2048,
    ) -> None:
        self.model, self.pool, self.backend, self.device = model, pool, backend, device
        self.prefill_chunk = prefill_chunk
        self.page_size = pool.page_size

    def _slots(self, block_table: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return block_table[positions // self.page_size] * self.page_size + positions % self.page_size

    @torch.inference_mode()
    def prefill(self, seq: Sequence, all_logits: bool = False) -> torch.Tensor:
        """Cache every not-yet-cached token of seq; logits of the last one [V] (or all: [T, V])."""
        ids = seq.all_ids
        self.pool.allocator.grow(seq.block_table, len(ids))
        table = torch.tensor(seq.block_table, device=self.device)
        outputs = []
        for start in range(seq.num_cached, len(ids), self.prefill_chunk):
            end = min(start + self.prefill_chunk, len(ids))
            positions = torch.arange(start, end, device=self.device)
            ctx = StepContext(
                backend=self.backend,
                is_prefill=True,
                slots=self._slots(table, positions),
                block_tables=table[None],
                context_lens=torch.tensor([end], device=self.device),
                seq_ids=(seq.seq_id,),
                host_context_lens=(end,),
                cached_len=start,
            )
            input_ids = torch.tensor(ids[start:end], device=self.device)
            hidden = self.model(input_ids, positions, ctx)
            outputs.append(self.model.compute_logits(hidden if all_logits else hidden[-1:]))
            seq.num_cached = end
        return torch.cat(outputs) if all_logits else outputs[-1][0]

    @torch.inference_mode()
    def decode(self, seqs: list[Sequence]) -> torch.Tensor:
        """One token for each sequence: feeds each one's last token; logits [B, V]."""
        for seq in seqs:
            self.pool.allocator.grow(seq.block_table, seq.num_tokens)
        width = max(len(s.block_table) for s in seqs)
        tables = torch.tensor(
            [s.block_table + [0] * (width - len(s.block_table)) for s in seqs], device=self.device
        )
        positions = torch.tensor([s.num_cached for s in seqs], device=self.device)
        slot_pages = tables.gather(1, (positions // self.page_size)[:, None])[:, 0]
        ctx = StepContext(
            backend=self.backend,
            is_prefill=False,
            slots=slot_pages * self.page_size + positions % self.page_size,
            block_tables=tables,
            context_lens=positions + 1,
            seq_ids=tuple(s.seq_id for s in seqs),
            host_context_lens=tuple(s.num_cached + 1 for s in seqs),
        )
        input_ids = torch.tensor([s.all_ids[-1] for s in seqs], device=self.device)
        hidden = self.model(input_ids, positions, ctx)
        self.backend.end_step(ctx)
        for seq in seqs:
            seq.num_cached += 1
        return self.model.compute_logits(hidden)

    def truncate(self, seq: Sequence, num_tokens: int) -> None:
        """Keep only the first num_tokens cached tokens of seq (a chat turn rewrote the rest)."""
        seq.num_cached = min(seq.num_cached, num_tokens)
        self.pool.allocator.shrink(seq.block_table, seq.num_cached)

    def release(self, seq: Sequence) -> None:
        """Give the sequence's pages and any backend state back at once."""
        self.pool.allocator.free(seq.block_table)
        self.backend.free(seq.seq_id)
        seq.num_cached = 0
