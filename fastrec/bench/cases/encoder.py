"""Encoder-layer rows: a SASRec block at inference (eval, no_grad, causal), CPU only; a SASRec
block's training step (forward + backward, dropout 0.2) on every device."""

from __future__ import annotations

import torch

import fastrec
from fastrec.bench.harness import Case, dtype_name


def cases(device: torch.device, dtype: torch.dtype, full: bool) -> list[Case]:
    """fastrec.nn.TransformerEncoderLayer (one C++ op) against torch's layer on its native fast
    path, at B=1 and B=128 (CPU only: the serving op is a CPU op); and the training step: the fused
    training op (CUDA; on the CPU the layer routes to its unfused path) against the unfused fastrec
    layer and torch's layer."""
    train = [_training_case(device, dtype, 256 if device.type == "cuda" else 32)]
    if device.type != "cpu":
        return train
    return [_inference_case(dtype, batch) for batch in (1, 128)] + train


def _inference_case(dtype: torch.dtype, batch: int, length: int = 50) -> Case:
    embed, heads, ff = 64, 2, 256
    torch.manual_seed(0)
    kwargs = dict(dropout=0.2, activation="gelu", batch_first=True, dtype=dtype)
    ref = torch.nn.TransformerEncoderLayer(embed, heads, ff, **kwargs).eval()
    ours = fastrec.nn.TransformerEncoderLayer(embed, heads, ff, **kwargs).eval()
    ours.load_state_dict(ref.state_dict())
    mask = torch.nn.Transformer.generate_square_subsequent_mask(length, dtype=dtype)
    x = torch.randn(batch, length, embed, dtype=dtype)

    def run(module):
        def call():
            with torch.no_grad():
                return module(x, src_mask=mask, is_causal=True)

        return call

    fns = {"fastrec": run(ours), "nn.TransformerEncoderLayer": run(ref)}
    flops = 2 * batch * length * (4 * embed * embed + 2 * embed * ff) + 2 * batch * length * length * embed
    io = 2 * batch * length * embed * dtype.itemsize
    shape = f"B={batch} L={length} E={embed} H={heads} F={ff} causal"
    return Case("encoder", "encoder layer, eval", shape, dtype_name(dtype), "forward", fns, flops, io)


def _training_case(device: torch.device, dtype: torch.dtype, batch: int, length: int = 50) -> Case:
    """SASRec's block in training (E=64, H=2, F=256, GELU, post-norm, causal, dropout 0.2):
    forward and backward of the input and every parameter. ``fastrec unfused``: torch's forward
    over fastrec's attention and dropout modules (the layer before the fused op)."""
    embed, heads, ff = 64, 2, 256
    torch.manual_seed(0)
    kwargs = dict(dropout=0.2, activation="gelu", batch_first=True, dtype=dtype, device=device)
    ref = torch.nn.TransformerEncoderLayer(embed, heads, ff, **kwargs).train()
    ours = fastrec.nn.TransformerEncoderLayer(embed, heads, ff, **kwargs).train()
    ours.load_state_dict(ref.state_dict())
    mask = torch.ones(length, length, dtype=torch.bool, device=device).triu(1)
    x = torch.randn(batch, length, embed, dtype=dtype, device=device, requires_grad=True)
    grad = torch.randn_like(x)

    def step(module, forward):
        params = [x, *module.parameters()]

        def call():
            return torch.autograd.grad(forward(module, x, src_mask=mask, is_causal=True), params, grad)

        return call

    fns = {
        "fastrec": step(ours, lambda m, *a, **k: m(*a, **k)),
        "fastrec unfused": step(ours, torch.nn.TransformerEncoderLayer.forward),
        "nn.TransformerEncoderLayer": step(ref, lambda m, *a, **k: m(*a, **k)),
    }
    flops = 3 * (2 * batch * length * (4 * embed * embed + 2 * embed * ff) + 2 * batch * length * length * embed)
    io = 4 * batch * length * embed * dtype.itemsize
    shape = f"B={batch} L={length} E={embed} H={heads} F={ff} causal p=0.2"
    # The CPU has no whole-layer training kernel to force (the layer is its ops' composition there).
    return Case(
        "encoder", "encoder layer, train step", shape, dtype_name(dtype), "forward+backward", fns, flops, io,
        force_when_routed=device.type != "cpu",
    )  # fmt: skip
