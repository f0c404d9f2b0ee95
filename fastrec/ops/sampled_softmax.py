"""Sampled losses over a large output table: sampled softmax with the log-Q correction, and gBCE.

Both score a hidden state ``h`` (R, d) against rows of a class table ``W`` (V, d) (class ``c`` is
row ``c``; the models pass their item table without the padding row) instead of against all V
classes. The contract:

``draw_negatives(n, V, sampler, frequency, generator) -> (negatives (n,) long, q (V,) or None)``

- ``"uniform"``: n classes drawn uniformly from 0..V-1 with replacement; ``"popularity"``: drawn
  with probability ``frequency[c] / frequency.sum()`` with replacement; ``"in-batch"``: none
  (n must be 0). Drawn from torch's generator (``generator``, or the default one for the
  device), so a seeded generator reproduces them. One set of negatives is shared by every row.

``sampled_softmax(h, W, target, negatives, q, ignore_index, reduction) -> loss``

- The candidates are the distinct classes among the batch's targets (rows with ``target ==
  ignore_index`` excluded) and the negatives: one table ``W[candidates]`` (C, d) shared by every
  row, so the logits are one (R, C) product and the loss is one cross-entropy over a table
  (``_ce_over_table``). Sharing is why each row's negatives include the other rows' targets
  (in-batch negatives): the one table must hold every row's positive. A negative equal to a row's
  own target is that row's positive column, never a second copy: accidental hits are removed.
- The log-Q correction (Bengio & Senecal 2008; Jean et al. 2015; in-batch: Yi et al., RecSys
  2019): each candidate's logit is lowered by ``log E[c]``, E[c] the expected number of times c
  enters the candidate multiset, ``count of c among the batch's targets + n * q[c]`` (q the
  negatives' sampling distribution; the targets enter as drawn, their count is observed). This is
  the table's bias.
- ``loss`` is cross-entropy of row r's corrected logits at its target's column, reduced as
  ``F.cross_entropy`` reduces (``"mean"`` over rows whose target is not ``ignore_index``).

``gbce(h, W, target, negatives, beta, ignore_index, reduction) -> loss``

- gBCE, the generalised binary cross-entropy of gSASRec (Petrov & Macdonald, "gSASRec: Reducing
  Overconfidence in Sequential Recommendation Trained with Negative Sampling", RecSys 2023):
  per row ``-log(sigmoid(s+) ** beta) - sum_j log(1 - sigmoid(s_j))`` = ``beta * softplus(-s+) +
  sum_j softplus(s_j)``, s+ = h . W[target], s_j = h . W[negative_j] over the shared negatives
  other than the row's target (accidental hits contribute nothing). The paper's beta = alpha *
  (t * (1 - 1 / alpha) + 1 / alpha) with the sampling rate alpha = n / (V - 1) and calibration t
  in [0, 1] (``gbce_beta``): t = 0 is plain BCE (beta = 1), t = 1 gives beta = alpha.
- Reduction over rows as above.

No Triton or C++ kernel of its own: the candidate table is small, the cost is the (R, C)
product; the CE over it is the one call ``_ce_over_table`` (full-catalogue CE of the models uses it
too), which runs the fused linear cross-entropy.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor

from fastrec import backends

SAMPLERS = ("uniform", "popularity", "in-batch")
REDUCTIONS = ("mean", "sum", "none")


def _ce_over_table(
    h: Tensor, table: Tensor, target: Tensor, bias: Tensor | None, ignore_index: int, reduction: str
) -> Tensor:
    """Softmax cross-entropy of ``h @ table.T + bias`` at ``target``: ``h`` (R, d), ``table``
    (C, d), ``bias`` (C,) or None, ``target`` (R,) long in 0..C-1 or ``ignore_index``. Runs
    ``fastrec.functional.linear_cross_entropy`` (the logits never materialised; small tables go to
    torch's dense path by its routing rule). Under autocast the operands take autocast's dtype and
    the loss is float32, as ``F.cross_entropy(F.linear(...))`` gives."""
    from fastrec import functional as FF  # functional imports this module

    dtype = backends.autocast_dtype(h.device.type)
    if dtype is not None:
        h, table = h.to(dtype), table.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    with torch.autocast(h.device.type, enabled=False) if dtype is not None else contextlib.nullcontext():
        loss = FF.linear_cross_entropy(h, table, target, bias=bias, ignore_index=ignore_index, reduction=reduction)
    return loss.float() if dtype is not None else loss


def draw_negatives(
    n: int,
    n_classes: int,
    sampler: str,
    frequency: Tensor | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> tuple[Tensor, Tensor | None]:
    """``(negatives (n,) long, q (n_classes,) sampling probabilities or None for in-batch)``
    (module docstring)."""
    if sampler == "in-batch":
        return torch.empty(0, dtype=torch.long, device=device), None
    if sampler == "uniform":
        negatives = torch.randint(0, n_classes, (n,), generator=generator, device=device)
        return negatives, torch.full((n_classes,), 1.0 / n_classes, dtype=torch.float64, device=device)
    q = frequency.to(device=device, dtype=torch.float64)
    q = q / q.sum()
    negatives = torch.multinomial(q, n, replacement=True, generator=generator)
    return negatives, q


def candidate_table(
    target: Tensor, negatives: Tensor, q: Tensor | None, ignore_index: int
) -> tuple[Tensor, Tensor, Tensor]:
    """``(candidates (C,), log E (C,) fp64, target's column (R,) or ignore_index)``: the
    distinct classes among the valid targets and the negatives, and the log-Q correction."""
    valid = target != ignore_index
    pool = torch.cat([target[valid], negatives])
    candidates, inverse = torch.unique(pool, return_inverse=True)
    n_valid = int(valid.sum())
    expected = torch.bincount(inverse[:n_valid], minlength=candidates.shape[0]).to(torch.float64)
    if q is not None:
        expected = expected + negatives.shape[0] * q[candidates]
    column = torch.full_like(target, ignore_index)
    column[valid] = inverse[:n_valid]
    return candidates, expected.log(), column


def sampled_softmax(
    h: Tensor, W: Tensor, target: Tensor, negatives: Tensor, q: Tensor | None, ignore_index: int, reduction: str
) -> Tensor:
    """Sampled softmax with the log-Q correction over the shared candidate table (module docstring)."""
    candidates, log_expected, column = candidate_table(target, negatives, q, ignore_index)
    bias = (-log_expected).to(h.dtype)
    return _ce_over_table(h, W[candidates], column, bias, ignore_index, reduction)


def gbce_beta(n_negatives: int, n_classes: int, t: float) -> float:
    """gSASRec's beta = alpha * (t * (1 - 1 / alpha) + 1 / alpha), alpha = n / (V - 1)."""
    alpha = n_negatives / (n_classes - 1)
    return alpha * (t * (1.0 - 1.0 / alpha) + 1.0 / alpha)


def gbce(
    h: Tensor, W: Tensor, target: Tensor, negatives: Tensor, beta: float, ignore_index: int, reduction: str
) -> Tensor:
    """gBCE over the shared negatives, accidental hits masked (module docstring)."""
    valid = target != ignore_index
    safe = torch.where(valid, target, torch.zeros_like(target))
    positive = (h * W[safe]).sum(-1)
    negative = h @ W[negatives].t()  # (R, n)
    hit = negatives.unsqueeze(0) == safe.unsqueeze(1)
    per_row = beta * F.softplus(-positive) + F.softplus(negative).masked_fill(hit, 0.0).sum(-1)
    per_row = per_row.masked_fill(~valid, 0.0)
    if reduction == "none":
        return per_row
    if reduction == "sum":
        return per_row.sum()
    return per_row.sum() / valid.sum()
