"""Catalogue scoring without the score matrix: top-k items and target ranks, and their dispatch.

The contract every backend implements (C++: ``csrc/scoring.cpp``; Triton: ``kernels/scoring.py``;
torch: ``topk_torch`` / ``ranks_torch`` below, the readable dense references):

``topk(h, W, k, offsets, ids) -> (values (B, k), indices (B, k) int64)``
``ranks(h, W, target, offsets, ids) -> (ranks (B,) int64, ranks_excluded (B,) int64)``

- ``h`` (B, d) and ``W`` (V, d), one floating dtype and device; the score of item j for row b is
  ``h[b] . W[j]``. The cpp backend computes float32 / float64; Triton loads fp16 / bf16 / fp32 /
  fp64 and computes in fp32 (fp64 in fp64). Values come back in h's dtype.
- Exclusions: a CSR pair, ``offsets`` (B + 1,) int64 and ``ids`` (nnz,) int64 in ``[0, V)``;
  row b excludes ``ids[offsets[b]:offsets[b + 1]]`` (repeats allowed). ``offsets`` of size 0: no
  exclusion.
- ``topk``: an excluded item scores ``-inf``; the result is the first k items of the order
  "higher score first, NaN above everything, equal scores by lower index" (``torch.sort(scores,
  descending=True, stable=True)``). ``torch.topk`` leaves the order of equal scores unspecified
  (on the CPU it changes with the catalogue's size), so where scores tie exactly the result is
  this order, not a particular ``topk`` call's.
- ``ranks``: ``1 +`` the number of items ``j != target[b]`` with score ``>= `` the target's (ties
  count against the target); ``ranks_excluded`` the same without row b's excluded items (the
  target itself never excluded). A row with a NaN score anywhere gets 0 in both (the metrics
  reject it). A backend computes each score by one code path, so a target's score and the scores
  it is compared with are computed alike.
- Memory: cpp and Triton keep ``O(B * k)`` plus one item tile per worker (Triton's top-k: a
  (B, chunk) score block); never the (B, V) matrix. No gradient flows (serving and evaluation).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from fastrec import backends, routing

OP = "scoring"
HAVE_CPP = backends.available()["cpp"] is None and hasattr(torch.ops.fastrec, "scoring_topk_cpp")
_CPP_DTYPES = (torch.float32, torch.float64)
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# --------------------------------------------------------------------------- exclusions
def _is_int(dtype: torch.dtype) -> bool:
    return not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool)


def exclusions(exclude, B: int, V: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """``exclude`` as the CSR pair (offsets (B + 1,), ids) int64 on ``device``, padding dropped;
    two empty tensors for None."""
    empty = torch.zeros(0, dtype=torch.long, device=device)
    if exclude is None:
        return empty, empty
    if isinstance(exclude, Tensor):
        if exclude.dim() != 2 or exclude.shape[0] != B or not _is_int(exclude.dtype):
            shape = tuple(exclude.shape)
            raise ValueError(f"exclude must be an int (B, E) = ({B}, E) tensor, got {exclude.dtype} {shape}")
        exclude = exclude.to(device, torch.long)
        keep = exclude >= 0
        counts, ids = keep.sum(dim=1), exclude[keep]
    else:
        if isinstance(exclude, (str, bytes)) or not isinstance(exclude, Sequence) or len(exclude) != B:
            size = len(exclude) if isinstance(exclude, Sequence) else type(exclude).__name__
            raise ValueError(f"exclude must hold one 1-D int sequence per row ({B}), got {size}")
        rows = []
        for i, row in enumerate(exclude):
            row = torch.as_tensor(row.detach().cpu() if isinstance(row, Tensor) else np.asarray(row))
            if row.dim() != 1 or not (row.numel() == 0 or _is_int(row.dtype)):
                raise ValueError(f"exclude[{i}] must be a 1-D int sequence, got {row.dtype} {tuple(row.shape)}")
            rows.append(row.long()[row >= 0])
        counts = torch.tensor([len(r) for r in rows], dtype=torch.long)
        ids = torch.cat(rows) if rows else torch.zeros(0, dtype=torch.long)
        counts, ids = counts.to(device), ids.to(device)
    if ids.numel() and int(ids.max()) >= V:
        raise ValueError(f"exclude ids must lie in 0..{V - 1} (or < 0 for padding), got {int(ids.max())}")
    offsets = torch.zeros(B + 1, dtype=torch.long, device=device)
    torch.cumsum(counts, dim=0, out=offsets[1:])
    return offsets, ids


# --------------------------------------------------------------------------- torch reference
def exclusion_mask(offsets: Tensor, ids: Tensor, B: int, V: int, device: torch.device) -> Tensor | None:
    """Bool (B, V), True = excluded, from the CSR pair; None without exclusions."""
    if offsets.numel() == 0:
        return None
    rows = torch.repeat_interleave(torch.arange(B, device=device), (offsets[1:] - offsets[:-1]).to(device))
    mask = torch.zeros(B, V, dtype=torch.bool, device=device)
    mask[rows, ids.to(device)] = True
    return mask


def topk_torch(h: Tensor, W: Tensor, k: int, offsets: Tensor, ids: Tensor) -> tuple[Tensor, Tensor]:
    """The dense reference: every score, excluded ones -inf, a stable descending sort."""
    scores = h @ W.t()
    mask = exclusion_mask(offsets, ids, h.shape[0], W.shape[0], h.device)
    if mask is not None:
        scores = scores.masked_fill(mask, float("-inf"))
    values, indices = torch.sort(scores, dim=1, descending=True, stable=True)
    return values[:, :k].contiguous(), indices[:, :k].contiguous()


def ranks_torch(h: Tensor, W: Tensor, target: Tensor, offsets: Tensor, ids: Tensor) -> tuple[Tensor, Tensor]:
    """The dense reference: every score compared with the target's."""
    scores = h @ W.t()
    rows = torch.arange(h.shape[0], device=h.device)
    at_least = scores >= scores[rows, target].unsqueeze(1)  # the target counts itself once: 1-based
    nan = torch.isnan(scores).any(dim=1)
    ranks = at_least.sum(dim=1)
    mask = exclusion_mask(offsets, ids, h.shape[0], W.shape[0], h.device)
    if mask is None:
        ranks_excluded = ranks.clone()
    else:
        mask[rows, target] = False
        ranks_excluded = (at_least & ~mask).sum(dim=1)
    return ranks.masked_fill(nan, 0), ranks_excluded.masked_fill(nan, 0)


def topk_dense(h: Tensor, W: Tensor, k: int, offsets: Tensor, ids: Tensor) -> tuple[Tensor, Tensor]:
    """torch's own ops, as a model would run them: ``(h @ W.T).masked_fill(...).topk(k)`` (the
    routed path; ``topk`` orders equal scores as it likes)."""
    scores = h @ W.t()
    mask = exclusion_mask(offsets, ids, h.shape[0], W.shape[0], h.device)
    if mask is not None:
        scores.masked_fill_(mask, float("-inf"))
    return scores.topk(k, dim=1)


# --------------------------------------------------------------------------- registered ops
def _topk_fake(h: Tensor, W: Tensor, k: int, offsets: Tensor, ids: Tensor) -> tuple[Tensor, Tensor]:
    return h.new_empty(h.shape[0], k), h.new_empty(h.shape[0], k, dtype=torch.long)


def _ranks_fake(h: Tensor, W: Tensor, target: Tensor, offsets: Tensor, ids: Tensor) -> tuple[Tensor, Tensor]:
    return target.new_empty(h.shape[0]), target.new_empty(h.shape[0])


@backends.triton_op("scoring_topk_triton")
def scoring_topk_triton(h: Tensor, W: Tensor, k: int, offsets: Tensor, ids: Tensor) -> tuple[Tensor, Tensor]:
    from fastrec.kernels import scoring as kernels

    return kernels.topk(h, W, k, offsets, ids)


@backends.triton_op("scoring_ranks_triton")
def scoring_ranks_triton(h: Tensor, W: Tensor, target: Tensor, offsets: Tensor, ids: Tensor) -> tuple[Tensor, Tensor]:
    from fastrec.kernels import scoring as kernels

    return kernels.ranks(h, W, target, offsets, ids)


backends.register_fake(_topk_fake, scoring_topk_triton, cpp_op="scoring_topk_cpp")
backends.register_fake(_ranks_fake, scoring_ranks_triton, cpp_op="scoring_ranks_cpp")


# --------------------------------------------------------------------------- dispatch
def _unfused_reason(h: Tensor) -> str | None:
    """Why the tiled kernels do not cover this call, or None."""
    forced = backends.forced()
    if h.device.type not in ("cpu", "cuda") and forced is None:
        return f"no scoring kernel for {h.device.type} tensors"
    if h.device.type == "cpu" and forced != "triton":
        if h.dtype not in _CPP_DTYPES:
            return f"{h.dtype} on CPU (the cpp kernel takes float32 / float64)"
        if not HAVE_CPP and forced is None:
            return "fastrec._C has no scoring_topk_cpp (rebuild the extension)"
    elif h.dtype not in _TRITON_DTYPES:
        return f"dtype {h.dtype}"
    return None


def _backend(h: Tensor, W: Tensor) -> str:
    """The backend of one call; "dense" for a routed call (torch's own ops)."""
    reason = _unfused_reason(h)
    if reason is None and (route := routing.scoring(h, W)) is not None:
        backends.count(OP, "torch", route)
        return "dense"
    backend = backends.select(h.device, reason)
    backends.count(OP, backend, reason or "")
    return backend


def topk(h: Tensor, W: Tensor, k: int, offsets: Tensor, ids: Tensor) -> tuple[Tensor, Tensor]:
    """Top-k (values, indices) of each row of ``h`` against ``W`` (module docstring); checked
    arguments (``fastrec.functional.topk_scores`` checks them)."""
    h, W = h.detach(), W.detach()
    backend = _backend(h, W)
    if backend == "dense":
        return topk_dense(h, W, k, offsets, ids)
    if backend == "torch":
        return topk_torch(h, W, k, offsets, ids)
    if backend == "triton":
        return scoring_topk_triton(h, W, k, offsets, ids)
    return torch.ops.fastrec.scoring_topk_cpp(h, W, k, offsets.cpu(), ids.cpu())


def ranks(h: Tensor, W: Tensor, target: Tensor, offsets: Tensor, ids: Tensor) -> tuple[Tensor, Tensor]:
    """(ranks, ranks_excluded) of each row's target (module docstring); checked arguments."""
    h, W = h.detach(), W.detach()
    backend = _backend(h, W)
    if backend in ("dense", "torch"):
        return ranks_torch(h, W, target, offsets, ids)
    if backend == "triton":
        return scoring_ranks_triton(h, W, target, offsets, ids)
    return torch.ops.fastrec.scoring_ranks_cpp(h, W, target, offsets.cpu(), ids.cpu())
