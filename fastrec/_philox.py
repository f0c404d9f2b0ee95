"""The dropout random stream shared by every backend, written with torch ops.

Each attention probability ``P[b, h, i, j]`` is kept when ``u >= dropout_p``, where ``u`` is
uniform in [0, 1) drawn from Philox4x32-10 (Salmon et al., SC'11) with

- key ``(seed & 0xffffffff, seed >> 32)``;
- counter ``(i * L_k + j, b * heads + h, 0, 0)``;
- ``u = (c0 >> 8) * 2**-24`` from the first output word (exact in fp32).

The Triton kernels (``tl.philox``) and the C++ kernels compute the same bits, so all three
backends drop the same entries for the same seed. This module is the readable reference.
"""

from __future__ import annotations

import torch

_MASK32 = 0xFFFFFFFF
_ROUND_A = 0xD2511F53
_ROUND_B = 0xCD9E8D57
_KEY_A = 0x9E3779B9
_KEY_B = 0xBB67AE85


def _umulhi(a: int, b: torch.Tensor) -> torch.Tensor:
    # int64 products of two uint32 wrap, but their bit pattern is the unsigned product.
    return ((b * a) >> 32) & _MASK32


def philox_uniform(seed: int | torch.Tensor, c0: torch.Tensor, c1: torch.Tensor) -> torch.Tensor:
    """Uniform [0, 1) float32 values for counters ``(c0, c1, 0, 0)`` (int64 tensors < 2**32).

    ``seed`` is an int or an int64 tensor of shape (1,) (no host sync, so it traces).
    """
    k0, k1 = seed & _MASK32, (seed >> 32) & _MASK32
    c0, c1 = c0.to(torch.int64), c1.to(torch.int64)
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    for _ in range(10):
        new_c0 = _umulhi(_ROUND_B, c2) ^ c1 ^ k0
        new_c2 = _umulhi(_ROUND_A, c0) ^ c3 ^ k1
        c1 = (c2 * _ROUND_B) & _MASK32
        c3 = (c0 * _ROUND_A) & _MASK32
        c0, c2 = new_c0, new_c2
        k0 = (k0 + _KEY_A) & _MASK32
        k1 = (k1 + _KEY_B) & _MASK32
    return (c0 >> 8).to(torch.float32) * 2.0**-24


def dropout_keep_mask(
    seed: int | torch.Tensor, batch: int, heads: int, len_q: int, len_k: int, dropout_p: float, device=None
) -> torch.Tensor:
    """Bool ``(batch, heads, len_q, len_k)``: True where the attention probability is kept."""
    i = torch.arange(len_q, device=device, dtype=torch.int64).view(1, 1, -1, 1)
    j = torch.arange(len_k, device=device, dtype=torch.int64).view(1, 1, 1, -1)
    bh = torch.arange(batch * heads, device=device, dtype=torch.int64).view(batch, heads, 1, 1)
    c0 = (i * len_k + j).expand(batch, heads, len_q, len_k)
    c1 = bh.expand(batch, heads, len_q, len_k)
    return philox_uniform(seed, c0, c1) >= dropout_p
