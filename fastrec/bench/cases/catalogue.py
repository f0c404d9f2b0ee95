"""Large-catalogue rows (opt-in: ``fastrec bench --family catalogue``; minutes on a CPU): the
output layer over 10^5-10^6 items, where it is the whole cost. The fused loss
(``fastrec.functional.linear_cross_entropy``) against ``F.cross_entropy(h @ W.T)`` (and torch's
chunked ``F.linear_cross_entropy`` on CUDA, where it finishes); the fused top-k
(``fastrec.functional.topk_scores``) against ``torch.topk(h @ W.T)``; and one SASRec
all-positions training step (B=128, L=50) against the torch backend's model with the dense loss.
Times only: the loss's peak memory is measured by benchmarks/bench_linear_cross_entropy.py."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

import fastrec
from fastrec import functional as FF
from fastrec.bench.harness import Case, dtype_name

DIM = 64
LOSS_ITEMS = (100_000, 1_000_000)  # the loss rows, 512 rows each
TOPK_USERS, TOPK_ITEMS = (1, 1_000), 1_000_000
SASREC_ITEMS, SASREC_DENSE_MAX = (100_000, 1_000_000), 100_000  # the dense side only where it fits
DENSE = "F.cross_entropy(h @ W.T)"


def cases(device: torch.device, dtype: torch.dtype, full: bool) -> list[Case]:
    """The loss at 512 x 100k / 1M, the top-10 at batch 1 and 1,000 users over 1M items, the
    SASRec step at 100k and 1M items (the dense side only where its logits fit: 100k). fp32 on
    the CPU; on CUDA also bf16 (the models' autocast dtype)."""
    if device.type == "cpu" and dtype != torch.float32:
        return []
    rows = [_loss_case(device, dtype, 512, items) for items in LOSS_ITEMS]
    rows += [_topk_case(device, dtype, users, TOPK_ITEMS) for users in TOPK_USERS]
    rows += [_sasrec_case(device, dtype, items, dense=items <= SASREC_DENSE_MAX) for items in SASREC_ITEMS]
    return rows


def _loss_case(device: torch.device, dtype: torch.dtype, rows: int, items: int) -> Case:
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(rows, DIM, generator=gen).to(device, dtype).requires_grad_()
    W = (torch.randn(items, DIM, generator=gen) * 0.1).to(device, dtype).requires_grad_()
    target = torch.randint(0, items, (rows,), generator=gen).to(device)

    def step(loss_fn):
        def call():
            h.grad = W.grad = None
            loss_fn().backward()

        return call

    fns = {
        "fastrec": step(lambda: FF.linear_cross_entropy(h, W, target)),
        DENSE: step(lambda: F.cross_entropy(h @ W.T, target)),
    }
    if device.type == "cuda" and hasattr(F, "linear_cross_entropy"):
        fns["F.linear_cross_entropy (chunked)"] = step(lambda: F.linear_cross_entropy(h, W, target))
    flops = 3 * 2 * rows * items * DIM
    io = (2 * items * DIM + 2 * rows * DIM) * dtype.itemsize
    shape = f"N={rows} V={items} d={DIM}"
    return Case("catalogue", "linear_cross_entropy", shape, dtype_name(dtype), "forward+backward", fns, flops, io)


def _topk_case(device: torch.device, dtype: torch.dtype, users: int, items: int, k: int = 10) -> Case:
    gen = torch.Generator().manual_seed(1)
    h = torch.randn(users, DIM, generator=gen).to(device, dtype)
    W = torch.randn(items, DIM, generator=gen).to(device, dtype)

    def ours():
        with torch.inference_mode():
            return FF.topk_scores(h, W, k)

    def dense():
        with torch.inference_mode():
            return torch.topk(h @ W.T, k, dim=1)

    fns = {"fastrec": ours, "torch.topk(h @ W.T)": dense}
    flops = 2 * users * items * DIM
    io = items * DIM * dtype.itemsize
    shape = f"users={users} V={items} d={DIM} k={k}"
    return Case("catalogue", "topk_scores", shape, dtype_name(dtype), "forward", fns, flops, io)


def _sasrec_case(device: torch.device, dtype: torch.dtype, items: int, dense: bool) -> Case:
    from fastrec.models import MODELS
    from fastrec.models.base import ModelInput

    batch, length = 128, 50
    gen = torch.Generator().manual_seed(2)
    seqs = torch.randint(1, items + 1, (batch, length + 1), generator=gen)
    data = ModelInput(
        seqs[:, :-1].to(device), torch.full((batch,), length, device=device), None, seqs[:, 1:].to(device)
    )
    autocast = device.type == "cuda" and dtype == torch.bfloat16

    def step(model, force: str | None):
        def call():
            model.zero_grad(set_to_none=True)
            with (
                torch.autocast(device.type, torch.bfloat16, enabled=autocast),
                fastrec.use_backend(force) if force else contextlib.nullcontext(),
            ):
                loss = model.loss(data, "ce")
            loss.backward()

        return call

    fns = {}
    for side, backend, force in (("fastrec", "fastrec", None), ("torch backend, dense loss", "torch", "torch")):
        if side != "fastrec" and not dense:
            continue
        torch.manual_seed(0)
        model = MODELS["sasrec"](items, backend=backend, max_len=length, dim=DIM).to(device).train()
        fns[side] = step(model, force)
    rows = batch * length
    flops = 3 * 2 * rows * items * DIM
    io = 2 * (items + 1) * DIM * 4
    shape = f"B={batch} L={length} V={items} d={DIM} all positions"
    return Case("catalogue", "SASRec training step", shape, dtype_name(dtype), "forward+backward", fns, flops, io)
