"""Expert capacity: which assignments an expert keeps when ``capacity_factor`` caps it.

Shape key: T tokens, A assignments (token, expert) pairs, S kept assignments sorted by
expert, E experts, G capacity groups (sequences, or one group for the whole batch).

Each expert keeps at most ``C = ceil(cf * n * k / E)`` assignments per group of n tokens.
Which ones, by policy:

- ``gshard`` (GShard, Switch, DeepSpeed): every token's first choice has priority over
  any second choice, and so on; within one choice rank, earlier tokens first. After the
  cut a token's surviving gates are rescaled so that they keep the token's pre-drop gate
  sum: for gates renormalised over the k chosen (top-k with k > 1) that is exactly
  DeepSpeed's renormalisation over the surviving routes (``g_i / sum of surviving g``),
  and a top-1 gate (Switch's raw probability) is unchanged.
- ``token_order``: assignments in the order the router listed them (token-major for
  token choice, so a token's second choice competes with later tokens' first choices);
  gates are kept as they were.

Groups: the whole flattened batch, or each sequence (``capacity_per_sequence``, as
Hugging Face Switch counts ``expert_capacity`` per sequence).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from moex.ops import sort_by_expert

__all__ = ["POLICIES", "expert_capacity", "capacity_mask", "keep_within_capacity", "renormalise_survivors"]

POLICIES = ("gshard", "token_order")


def expert_capacity(capacity_factor: float, num_tokens: int, top_k: int, num_experts: int) -> int:
    """C = ceil(cf * n * k / E): the most assignments one expert keeps per group of n tokens."""
    return math.ceil(capacity_factor * num_tokens * top_k / num_experts)


def capacity_mask(bucket_sorted_A: Tensor, counts_B: Tensor, capacity: int) -> Tensor:
    """Keep the first ``capacity`` assignments of each bucket (assignments sorted by bucket)."""
    starts_B = torch.cumsum(counts_B, 0) - counts_B
    pos_A = torch.arange(bucket_sorted_A.numel(), device=bucket_sorted_A.device) - starts_B[bucket_sorted_A]
    return pos_A < capacity


def keep_within_capacity(expert_A: Tensor, token_A: Tensor, choice_A: Tensor | None, num_experts: int,
                         num_tokens: int, capacity: int, *, policy: str = "gshard", group_size: int | None = None
                         ) -> tuple[Tensor, Tensor]:
    """The kept assignments, grouped by expert, and the kept count per expert.

    Args:
        expert_A, token_A: the routing decision (any order) over ``num_tokens`` tokens.
        choice_A: rank of each assignment among its token's choices (0 = first), or None
            (then priority is the listed order under either policy).
        capacity: per expert and group.
        policy: ``gshard`` or ``token_order`` (module docstring).
        group_size: tokens per capacity group (a sequence length); None = one group.

    Returns:
        ``(order_S, counts_E)``: indices into the assignments, sorted by expert (within an
        expert: by group, then priority), and int64 kept rows per expert.
    """
    if policy not in POLICIES:
        raise ValueError(f"unknown capacity_policy {policy!r}; valid: {', '.join(POLICIES)}")
    E = num_experts
    if policy == "gshard" and choice_A is not None:  # priority = (choice rank, token)
        prio_A = torch.argsort(choice_A.to(torch.int64) * num_tokens + token_A, stable=True)
    else:
        prio_A = None  # the listed order already is the priority
    G, bucket_A = 1, expert_A
    if group_size is not None:
        G = max(1, -(-num_tokens // group_size))
        bucket_A = expert_A * G + torch.div(token_A, group_size, rounding_mode="floor")  # still expert-major
    keys = bucket_A if prio_A is None else bucket_A.index_select(0, prio_A)
    order_A, counts_B = sort_by_expert(keys, E * G)
    keep = capacity_mask(keys.index_select(0, order_A), counts_B, capacity)
    order_S = order_A[keep]
    if prio_A is not None:
        order_S = prio_A.index_select(0, order_S)
    return order_S, counts_B.clamp_max(capacity).view(E, G).sum(1)


def renormalise_survivors(gate_S: Tensor, token_S: Tensor, gate_A: Tensor, token_A: Tensor, num_tokens: int) -> Tensor:
    """Rescale kept gates so each token's kept gates sum to its pre-drop gate sum (differentiable)."""
    sum_all_T = gate_A.new_zeros(num_tokens).index_add(0, token_A, gate_A)
    sum_kept_T = gate_S.new_zeros(num_tokens).index_add(0, token_S, gate_S)
    return gate_S * (sum_all_T.index_select(0, token_S) / sum_kept_T.index_select(0, token_S))
