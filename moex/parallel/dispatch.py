"""Expert-parallel dispatch: send each assignment row to the rank that owns its expert.

Shape key: A assignment rows on this rank (sorted by global expert), D model dim,
H hidden units per expert, E global experts, P ranks in the expert-parallel (EP)
group, El = E / P experts per rank, R rows received by this rank.

Rank p of the EP group owns global experts [p*El, (p+1)*El). One layer forward:

1. exchange counts: ``counts_E`` viewed as [P, El] (row p = what goes to rank p);
   an all-to-all turns it into ``recv_PEl`` (row p = what rank p sends us);
2. variable-split all-to-all of the rows (autograd: its backward is the reverse
   all-to-all). Received rows arrive grouped (source rank, local expert);
3. re-order them to (local expert, source rank) so each local expert's rows are
   contiguous, run the local grouped GEMM, undo the re-order;
4. all-to-all the outputs back; they land in the caller's original row order.

Dropless: no capacity, no padding; a rank may receive zero rows for an expert,
or none at all. Which hidden units fired travels back too (no grad) for the layer's
sparsity statistics, as a uint8 mask (h > 0).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed._functional_collectives import all_to_all_single_autograd, wait_tensor

__all__ = ["ExpertParallelDispatcher", "exchange_counts", "source_to_expert_order"]


def exchange_counts(counts_E: Tensor, group) -> Tensor:
    """All-to-all of per-expert counts: returns recv_PEl[p, j] = rows rank p sends to local expert j."""
    P = dist.get_world_size(group)
    send = counts_E.to(torch.int64).contiguous()
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    return recv.view(P, send.numel() // P)


def source_to_expert_order(recv_PEl: Tensor) -> Tensor:
    """Index idx_R with rows[idx_R] grouped by (local expert, source rank).

    Received rows are laid out block by block in (source rank, local expert)
    order with block sizes recv_PEl; the result lists, for every target position,
    the received row that goes there.
    """
    P, El = recv_PEl.shape
    sizes_src = recv_PEl.reshape(-1)  # blocks in (p, j) order
    starts_src_PEl = (torch.cumsum(sizes_src, 0) - sizes_src).view(P, El)
    sizes_tgt = recv_PEl.t().reshape(-1)  # blocks in (j, p) order
    starts_tgt = torch.cumsum(sizes_tgt, 0) - sizes_tgt
    R = int(sizes_src.sum())
    block_src_start = torch.repeat_interleave(starts_src_PEl.t().reshape(-1), sizes_tgt, output_size=R)
    block_tgt_start = torch.repeat_interleave(starts_tgt, sizes_tgt, output_size=R)
    return block_src_start + (torch.arange(R, device=recv_PEl.device) - block_tgt_start)


def _all_to_all(x: Tensor, out_splits: list[int], in_splits: list[int], group) -> Tensor:
    return wait_tensor(all_to_all_single_autograd(x.contiguous(), out_splits, in_splits, group))


class ExpertParallelDispatcher:
    """Callable installed as ``MoELayer.dispatcher``: ``(experts, x_AD, counts_E, backend) -> (y_AD, active_AH)``.

    ``experts`` holds only this rank's El experts; ``counts_E`` counts rows per
    *global* expert. Gradients flow to x_AD and to the local expert weights.
    ``active_AH`` is ``h_AH > 0`` as uint8 (no grad): what the layer's sparsity
    statistics read, at a quarter of the traffic of the fp32 hidden values.
    """

    def __init__(self, group, num_experts: int):
        self.group = group
        self.ep_size = dist.get_world_size(group)
        if num_experts % self.ep_size:
            raise ValueError(f"num_experts={num_experts} is not divisible by the EP group size {self.ep_size}")
        self.num_experts = num_experts

    def __call__(self, experts, x_AD: Tensor, counts_E: Tensor, backend: str = "auto") -> tuple[Tensor, Tensor]:
        P, E = self.ep_size, self.num_experts
        if counts_E.numel() != E:
            raise ValueError(f"counts_E has {counts_E.numel()} entries, expected {E} global experts")
        recv_PEl = exchange_counts(counts_E, self.group)
        send_splits = counts_E.view(P, E // P).sum(1).tolist()
        recv_splits = recv_PEl.sum(1).tolist()

        x_RD = _all_to_all(x_AD, recv_splits, send_splits, self.group)
        idx_R = source_to_expert_order(recv_PEl.to(x_AD.device))
        inv_R = torch.empty_like(idx_R)
        inv_R[idx_R] = torch.arange(idx_R.numel(), device=idx_R.device)
        y_RD, h_RH = experts(x_RD.index_select(0, idx_R), recv_PEl.sum(0).to(counts_E.device), backend)
        y_AD = _all_to_all(y_RD.index_select(0, inv_R), send_splits, recv_splits, self.group)
        with torch.no_grad():  # hidden units only feed statistics: no gradient, plain collective
            active_RH = (h_RH.detach() > 0).to(torch.uint8).index_select(0, inv_R).contiguous()
            active_AH = active_RH.new_empty(x_AD.shape[0], active_RH.shape[1])
            dist.all_to_all_single(active_AH, active_RH, send_splits, recv_splits, group=self.group)
        return y_AD, active_AH
