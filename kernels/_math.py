"""``@triton.jit`` math helpers shared by the kernel families (rnn, conv, caser): the activations
written out in ``tl.exp`` so that they run the same on the GPU and in the interpreter (which has
no libdevice tanh)."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def sigmoid(x):
    """1 / (1 + exp(-x)) in x's dtype."""
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def tanh(x):
    """tanh by exp(-2|x|): sign(x) (1 - e) / (1 + e), e = exp(-2|x|) (no overflow; absolute
    error ~1 ulp of 1, in any float dtype)."""
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)
