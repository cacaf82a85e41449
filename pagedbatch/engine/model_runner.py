"""Runs one step of a transformers model over the paged KV cache."""

from __future__ import annotations

import torch

from pagedbatch.engine.attention import PagedAttention
from pagedbatch.engine.batch import Batch
from pagedbatch.engine.block_manager import BlockManager
from pagedbatch.engine.scheduler import SchedulerOutput


class ModelRunner:
    """Turns a SchedulerOutput into a Batch, runs the model, returns the logits to sample."""

    def __init__(self, model, attention: PagedAttention, block_manager: BlockManager) -> None:
        self.model = model
        self.attention = attention
        self.block_manager = block_manager
        self.device = next(model.parameters()).device

    def prepare(self, out: SchedulerOutput) -> Batch:
        """Run the step's block copies; flatten its scheduled tokens into one ragged batch."""
        self.attention.kv_cache.copy_blocks(out.copies)
        input_ids, positions, slots, starts, lens, last = [], [], [], [0], [], []
        for seq, n in out.scheduled:
            begin = seq.num_computed_tokens
            input_ids += seq.token_ids[begin : begin + n]
            positions += range(begin, begin + n)
            slots += [self.block_manager.slot(seq, p) for p in range(begin, begin + n)]
            starts.append(starts[-1] + n)
            lens.append(begin + n)
        last = [starts[i + 1] - 1 for i, s in enumerate(out.scheduled) if s.samples]
        width = max(len(s.seq.block_table) for s in out.scheduled)
        tables = [s.seq.block_table + [0] * (width - len(s.seq.block_table)) for s in out.scheduled]
        device = self.device

        def tensor(values: list[int], dtype: torch.dtype = torch.long) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)

        return Batch(
            input_ids=tensor(input_ids),
            positions=tensor(positions),
            slot_mapping=tensor(slots),
            block_tables=tensor(tables, torch.int32),
            context_lens=tensor(lens, torch.int32),
            query_start_loc=tensor(starts, torch.int32),
            logits_indices=tensor(last),
            context_lens_host=lens,
            query_start_loc_host=starts,
        )

    @torch.inference_mode()
    def forward(self, batch: Batch) -> torch.Tensor:  # [num_sampled, vocab]
        """Run the model over `batch`; return the logits of the sampling positions."""
        result = self.model(
            input_ids=batch.input_ids[None],
            position_ids=batch.positions[None],
            use_cache=False,
            logits_to_keep=batch.logits_indices,
            paged_attention=self.attention,
            paged_batch=batch,
        )
        return result.logits[0]
