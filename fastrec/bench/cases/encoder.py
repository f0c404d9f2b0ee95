"""Encoder-layer rows: a SASRec block at inference (eval, no_grad, causal), CPU only."""

from __future__ import annotations

import torch

import fastrec
from fastrec.bench.harness import Case, dtype_name


def cases(device: torch.device, dtype: torch.dtype, full: bool) -> list[Case]:
    """fastrec.nn.TransformerEncoderLayer (one C++ op) against torch's layer on its native fast
    path, at B=1 and B=128; none on CUDA (the fused layer is a CPU op)."""
    if device.type != "cpu":
        return []
    return [_inference_case(dtype, batch) for batch in (1, 128)]


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
