"""The dropout random stream shared by every backend, written with torch ops.

Each attention probability ``P[b, h, i, j]`` is kept when ``u >= dropout_p``, where ``u`` is
uniform in [0, 1) drawn from Philox4x32-10 (Salmon et al., SC'11) with

- key ``(seed & 0xffffffff, seed >> 32)``;
- counter ``(i * ceil(L_k / 4) + j // 4, b * heads + h, 0, 0)``: one Philox call serves the four
  adjacent keys ``4 * (j // 4) .. 4 * (j // 4) + 3`` of a query row;
- ``u = (w >> 8) * 2**-24`` from output word ``w`` number ``j % 4`` (exact in fp32).

The standalone dropout op uses the first word only (``philox_uniform``).

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


def philox_words(
    seed: int | torch.Tensor, c0: torch.Tensor, c1: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The four output words (int64 tensors holding uint32) for counters ``(c0, c1, 0, 0)``.

    ``c0``, ``c1``: int64 tensors < 2**32; ``seed``: an int or an int64 tensor of shape (1,) (no
    host sync, so it traces).
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
    return c0, c1, c2, c3


def word_uniform(word: torch.Tensor) -> torch.Tensor:
    """Uniform [0, 1) float32 values ``(word >> 8) * 2**-24`` of Philox output words."""
    return (word >> 8).to(torch.float32) * 2.0**-24


def philox_uniform(seed: int | torch.Tensor, c0: torch.Tensor, c1: torch.Tensor) -> torch.Tensor:
    """Uniform [0, 1) float32 values of the first word for counters ``(c0, c1, 0, 0)``."""
    return word_uniform(philox_words(seed, c0, c1)[0])


def dropout_keep_mask(
    seed: int | torch.Tensor, batch: int, heads: int, len_q: int, len_k: int, dropout_p: float, device=None
) -> torch.Tensor:
    """Bool ``(batch, heads, len_q, len_k)``: True where the attention probability is kept."""
    quads = -(-len_k // 4)
    i = torch.arange(len_q, device=device, dtype=torch.int64).view(1, 1, -1, 1)
    q = torch.arange(quads, device=device, dtype=torch.int64).view(1, 1, 1, -1)
    bh = torch.arange(batch * heads, device=device, dtype=torch.int64).view(batch, heads, 1, 1)
    c0 = (i * quads + q).expand(batch, heads, len_q, quads)
    c1 = bh.expand(batch, heads, len_q, quads)
    words = torch.stack(philox_words(seed, c0, c1), dim=-1)  # (batch, heads, len_q, quads, 4)
    u = word_uniform(words.flatten(-2)[..., :len_k])
    return u >= dropout_p
