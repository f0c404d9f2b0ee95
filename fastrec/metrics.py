"""Top-K ranking metrics for next-item prediction: HR@K, NDCG@K, MRR@K.

Full ranking: the target is ranked against every item ``1..n_items`` (column 0, the padding item,
never takes part). Ties count against the target (pessimistic): its rank is ``1 +`` the number of
other items scoring at least as high, so a model that scores everything alike gets the worst rank,
not the best. ``exclude`` (the user's earlier items) removes those items from the ranking, except
the target itself, which always stays. The sampled protocol ranks the target against
``n_negatives`` items drawn uniformly without replacement from the items that are neither the
target nor excluded (RecBole's ``uni100``).

Per-batch ranks are exact integers, so an evaluation loop can concatenate :func:`target_ranks`
over batches and call :func:`metrics_from_ranks` once.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

Exclude = Sequence[np.ndarray] | Tensor | None


def _check(scores: Tensor, target: Tensor) -> Tensor:
    if not isinstance(scores, Tensor) or scores.dim() != 2 or scores.shape[1] < 2:
        shape = tuple(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__
        raise ValueError(f"scores must be (batch, n_items + 1) with n_items >= 1, got {shape}")
    target = torch.as_tensor(target, device=scores.device).long()
    if target.shape != (scores.shape[0],):
        raise ValueError(f"target must be (batch,) = ({scores.shape[0]},), got {tuple(target.shape)}")
    if target.numel() and (int(target.min()) < 1 or int(target.max()) >= scores.shape[1]):
        raise ValueError(
            f"target items must lie in 1..{scores.shape[1] - 1}, got {int(target.min())}..{int(target.max())}"
        )
    if torch.isnan(scores).any():
        raise ValueError("scores contain NaN")
    return target


def _exclusion_mask(exclude: Exclude, scores: Tensor, target: Tensor) -> Tensor | None:
    """Bool (B, n_items + 1): True = item removed from the ranking (never the target, always column 0)."""
    if exclude is None:
        return None
    mask = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    if isinstance(exclude, Tensor):
        if exclude.dim() != 2 or exclude.shape[0] != scores.shape[0]:
            raise ValueError(f"exclude must be (batch, L) = ({scores.shape[0]}, L), got {tuple(exclude.shape)}")
        mask.scatter_(1, exclude.to(scores.device).long(), True)
    else:
        if len(exclude) != scores.shape[0]:
            raise ValueError(f"exclude must hold one array per row ({scores.shape[0]}), got {len(exclude)}")
        rows = np.concatenate([np.full(len(seen), r) for r, seen in enumerate(exclude)] + [np.zeros(0)])
        cols = np.concatenate([np.asarray(seen, dtype=np.int64) for seen in exclude] + [np.zeros(0, np.int64)])
        if cols.size:
            mask[torch.as_tensor(rows, dtype=torch.long), torch.as_tensor(cols, dtype=torch.long)] = True
    mask[:, 0] = True
    mask[torch.arange(scores.shape[0], device=scores.device), target] = False
    return mask


def target_ranks(scores: Tensor, target: Tensor, exclude: Exclude = None) -> Tensor:
    """1-based rank (B,) long of each target among items ``1..n_items`` under full ranking (module docstring)."""
    target = _check(scores, target)
    scores = scores.detach().float() if scores.dtype in (torch.float16, torch.bfloat16) else scores.detach()
    rows = torch.arange(scores.shape[0], device=scores.device)
    target_score = scores[rows, target].unsqueeze(1)
    at_least = scores >= target_score
    at_least[:, 0] = False
    mask = _exclusion_mask(exclude, scores, target)
    if mask is not None:
        at_least &= ~mask
    # The target itself is counted once by >=, which makes the count already 1-based.
    return at_least.sum(dim=1)


def full_ranks(hidden: Tensor, item_table: Tensor, target: Tensor, exclude: Exclude = None) -> tuple[Tensor, Tensor]:
    """:func:`target_ranks` of the scores ``hidden @ item_table.T`` without forming them: ranks
    (B,) long against every item, and the same with ``exclude`` removed (equal to the first
    without it). ``item_table`` (n_items + 1, d), row 0 the padding item (never ranked); ``hidden``
    (B, d); ``exclude`` as for :func:`target_ranks`. One pass over the catalogue, in item tiles
    (``fastrec.functional.target_ranks``; small catalogues score densely), memory O(B)."""
    from fastrec.ops import scoring as scoring_ops

    n_items = item_table.shape[0] - 1
    if hidden.dim() != 2 or item_table.dim() != 2 or n_items < 1 or hidden.shape[1] != item_table.shape[1]:
        raise ValueError(
            f"hidden must be (batch, d) and item_table (n_items + 1, d) with n_items >= 1, got "
            f"{tuple(hidden.shape)} and {tuple(item_table.shape)}"
        )
    target = torch.as_tensor(target, device=hidden.device).long()
    if target.shape != (hidden.shape[0],):
        raise ValueError(f"target must be (batch,) = ({hidden.shape[0]},), got {tuple(target.shape)}")
    if target.numel() and (int(target.min()) < 1 or int(target.max()) > n_items):
        raise ValueError(f"target items must lie in 1..{n_items}, got {int(target.min())}..{int(target.max())}")
    if isinstance(exclude, Tensor):
        if exclude.dim() != 2 or exclude.shape[0] != hidden.shape[0]:
            raise ValueError(f"exclude must be (batch, L) = ({hidden.shape[0]}, L), got {tuple(exclude.shape)}")
        exclude = exclude.to(hidden.device).long() - 1  # item 0 (padding) becomes -1: ignored
    elif exclude is not None:
        if len(exclude) != hidden.shape[0]:
            raise ValueError(f"exclude must hold one array per row ({hidden.shape[0]}), got {len(exclude)}")
        exclude = [np.asarray(seen, dtype=np.int64) - 1 for seen in exclude]
    offsets, ids = scoring_ops.exclusions(exclude, hidden.shape[0], n_items, hidden.device)
    hidden = hidden.detach()
    table = item_table.detach()[1:]
    if hidden.dtype in (torch.float16, torch.bfloat16) or table.dtype != hidden.dtype:
        hidden, table = hidden.float(), table.float()
    ranks, ranks_excluded = scoring_ops.ranks(hidden, table, target - 1, offsets, ids)
    if ranks.numel() and int(ranks.min()) == 0:
        raise ValueError("scores contain NaN")
    return ranks, ranks_excluded


def metrics_from_ranks(ranks: Tensor | np.ndarray, ks: Sequence[int] = (5, 10, 20)) -> dict[str, float]:
    """Mean HR@K (rank <= K), NDCG@K (1 / log2(rank + 1) if rank <= K) and MRR@K (1 / rank if rank <= K)."""
    ranks = torch.as_tensor(ranks).double().cpu()
    if ranks.numel() == 0:
        raise ValueError("no ranks to average (empty batch)")
    out: dict[str, float] = {}
    for k in ks:
        if k < 1:
            raise ValueError(f"ks must be >= 1, got {k}")
        hit = ranks <= k
        out[f"HR@{k}"] = float(hit.double().mean())
        out[f"NDCG@{k}"] = float(torch.where(hit, 1.0 / torch.log2(ranks + 1.0), 0.0).mean())
        out[f"MRR@{k}"] = float(torch.where(hit, 1.0 / ranks, 0.0).mean())
    return out


def rank_metrics(
    scores: Tensor, target: Tensor, ks: Sequence[int] = (5, 10, 20), exclude: Exclude = None
) -> dict[str, float]:
    """HR/NDCG/MRR@K with full ranking; ``exclude`` = seen items per row (list of arrays or (B, L) padded)."""
    return metrics_from_ranks(target_ranks(scores, target, exclude), ks)


def sampled_ranks(
    scores: Tensor, target: Tensor, n_negatives: int = 100, seed: int = 0, exclude: Exclude = None
) -> Tensor:
    """1-based rank (B,) of each target among itself and ``n_negatives`` uniformly sampled other items."""
    target = _check(scores, target)
    n_items = scores.shape[1] - 1
    mask = _exclusion_mask(exclude, scores, target)
    allowed = torch.ones(scores.shape, dtype=torch.bool, device=scores.device) if mask is None else ~mask
    allowed[:, 0] = False
    allowed[torch.arange(scores.shape[0], device=scores.device), target] = False
    available = allowed.sum(dim=1)
    if n_negatives < 1 or int(available.min()) < n_negatives:
        raise ValueError(
            f"n_negatives must be in 1..{int(available.min())} (the fewest candidate items of a row; "
            f"n_items = {n_items}), got {n_negatives}"
        )
    generator = torch.Generator(device="cpu").manual_seed(seed)
    keys = torch.rand(scores.shape, generator=generator).to(scores.device)
    keys = keys.masked_fill(~allowed, 2.0)  # never among the smallest n_negatives
    negatives = keys.topk(n_negatives, dim=1, largest=False).indices
    rows = torch.arange(scores.shape[0], device=scores.device)
    target_score = scores[rows, target].unsqueeze(1)
    return 1 + (scores.gather(1, negatives) >= target_score).sum(dim=1)


def sampled_metrics(
    scores: Tensor,
    target: Tensor,
    ks: Sequence[int] = (5, 10, 20),
    n_negatives: int = 100,
    seed: int = 0,
    exclude: Exclude = None,
) -> dict[str, float]:
    """HR/NDCG/MRR@K under the sampled protocol (target vs ``n_negatives`` uniform negatives)."""
    return metrics_from_ranks(sampled_ranks(scores, target, n_negatives, seed, exclude), ks)


def ndcg_at(rank: int, k: int) -> float:
    """NDCG@k of a single target at 1-based ``rank`` (for hand checks)."""
    return 1.0 / math.log2(rank + 1) if rank <= k else 0.0
