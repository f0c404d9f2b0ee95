"""The functional API: validate the arguments, put masks in canonical form, call the ops.

One section per op family, in the package's op order: attention, rnn, conv, caser, dropout.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from fastrec import backends
from fastrec.ops import attention as attention_ops
from fastrec.ops import caser as caser_ops
from fastrec.ops import conv as conv_ops
from fastrec.ops import dropout as dropout_ops
from fastrec.ops import linear_cross_entropy as lce_ops
from fastrec.ops import rnn as rnn_ops
from fastrec.ops import sampled_softmax as sampled_ops
from fastrec.ops import scoring as scoring_ops
from fastrec.ops._conv_common import ACTIVATIONS

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _shape(t: Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def _check_tensor(name: str, t: object) -> None:
    """TypeError naming ``name`` unless ``t`` is a tensor."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")


# =============================================================================================
# attention
# =============================================================================================
def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    key_padding_mask: Tensor | None = None,
    lengths: Tensor | None = None,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    scale: float | None = None,
    training: bool = True,
    need_weights: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Scaled dot-product attention on ``(batch, heads, L, head_dim)`` tensors.

    Masks follow ``nn.MultiheadAttention``: ``key_padding_mask`` ``(batch, L_k)`` bool (True =
    ignore that key) or float (added); ``lengths`` ``(batch,)`` keeps keys ``j < lengths[b]``
    (right padding); ``attn_mask`` broadcastable to ``(batch, heads, L_q, L_k)``, bool (True =
    NOT allowed, the opposite of ``F.scaled_dot_product_attention``) or float (added);
    ``causal`` lets query ``i`` see keys ``j <= i``. All masks combine. A query row with no
    allowed key returns zeros and passes no gradient. Dropout (``dropout_p`` when
    ``training``) acts on the attention probabilities and is reproducible from torch's RNG.
    ``need_weights=True`` returns ``(out, weights)``: the probabilities after dropout,
    ``(batch, heads, L_q, L_k)``, differentiable (fused on the CPU; the reference on CUDA).
    """
    _check_qkv(q, k, v)
    batch, heads, len_q, _ = q.shape
    len_k = k.shape[-2]
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if scale is not None and not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")

    if (dtype := backends.autocast_dtype(q.device.type)) is not None:
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)

    bias_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    bias = None
    if key_padding_mask is not None:
        _check_mask("key_padding_mask", key_padding_mask, q, (batch, len_k))
        if key_padding_mask.dtype != torch.bool and _is_zero_or_neginf(key_padding_mask):
            key_padding_mask = torch.isneginf(key_padding_mask)
        if key_padding_mask.dtype == torch.bool:
            key_padding_mask = key_padding_mask.contiguous()
        else:
            bias = key_padding_mask.to(bias_dtype)[:, None, None, :]
            key_padding_mask = None
    if lengths is not None:
        lengths = _check_lengths(lengths, q, batch, len_k)
    if attn_mask is not None:
        _check_mask("attn_mask", attn_mask, q, None)
        if attn_mask.dim() > 4:
            raise ValueError(f"attn_mask must have at most 4 dims, got shape {_shape(attn_mask)}")
        try:
            torch.broadcast_shapes(attn_mask.shape, (batch, heads, len_q, len_k))
        except RuntimeError:
            raise ValueError(
                f"attn_mask must broadcast to (batch, heads, L_q, L_k) = "
                f"{(batch, heads, len_q, len_k)}, got {_shape(attn_mask)}"
            ) from None
        if attn_mask.dtype == torch.bool:
            mask_bias = torch.zeros(attn_mask.shape, dtype=bias_dtype, device=q.device)
            mask_bias = mask_bias.masked_fill(attn_mask, float("-inf"))
        else:
            mask_bias = attn_mask.to(bias_dtype)
        bias = mask_bias if bias is None else bias + mask_bias
    if bias is not None:
        while bias.dim() < 4:
            bias = bias.unsqueeze(0)
        bias = bias.expand(bias.shape[0], bias.shape[1], len_q, len_k)

    return attention_ops.attention(
        q, k, v, key_padding_mask, lengths, bias, causal, scale, dropout_p if training else 0.0, need_weights
    )


def _is_zero_or_neginf(mask: Tensor) -> bool:
    """Whether a float mask is a bool mask in disguise (checked on the CPU only: no sync)."""
    if mask.device.type != "cpu" or mask.requires_grad or torch.compiler.is_compiling():
        return False
    return bool(((mask == 0) | torch.isneginf(mask)).all())


def _check_qkv(q: Tensor, k: Tensor, v: Tensor) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_tensor(name, t)
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D (batch, heads, L, head_dim), got shape {_shape(t)}")
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name} must have q's dtype {q.dtype}, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} must be on q's device {q.device}, got {t.device}")
        if t.shape[:2] != q.shape[:2]:
            raise ValueError(f"{name} must have q's (batch, heads) = {_shape(q)[:2]}, got {_shape(t)[:2]}")
    if k.shape[-1] != q.shape[-1]:
        raise ValueError(f"k must have q's head_dim {q.shape[-1]}, got {k.shape[-1]}")
    if v.shape[-2] != k.shape[-2]:
        raise ValueError(f"v must have k's length L_k = {k.shape[-2]}, got {v.shape[-2]}")


def _check_mask(name: str, mask: Tensor, q: Tensor, shape: tuple[int, ...] | None) -> None:
    _check_tensor(name, mask)
    if mask.dtype != torch.bool and not mask.is_floating_point():
        raise TypeError(f"{name} must be bool or floating point, got {mask.dtype}")
    if mask.device != q.device:
        raise ValueError(f"{name} must be on q's device {q.device}, got {mask.device}")
    if shape is not None and _shape(mask) != shape:
        raise ValueError(f"{name} must be (batch, L_k) = {shape}, got {_shape(mask)}")


def _check_lengths(lengths: Tensor, q: Tensor, batch: int, len_k: int) -> Tensor:
    if not isinstance(lengths, Tensor) or lengths.dtype.is_floating_point or lengths.dtype == torch.bool:
        raise TypeError(f"lengths must be an integer tensor, got {getattr(lengths, 'dtype', type(lengths))}")
    if _shape(lengths) != (batch,):
        raise ValueError(f"lengths must be (batch,) = ({batch},), got {_shape(lengths)}")
    lengths = lengths.to(device=q.device, dtype=torch.int32).contiguous()
    if not torch.compiler.is_compiling() and lengths.numel() > 0:
        low, high = int(lengths.min()), int(lengths.max())
        if low < 0 or high > len_k:
            raise ValueError(f"lengths must lie in [0, L_k = {len_k}], got values in [{low}, {high}]")
    return lengths


# =============================================================================================
# rnn: layers (RNN, GRU, LSTM) and cells
# =============================================================================================
_RNN_MODES = ("tanh", "relu", "gru", "lstm")
_RNN_GATES = {"tanh": 1, "relu": 1, "gru": 3, "lstm": 4}
RNNWeights = list[tuple[Tensor, Tensor, Tensor | None, Tensor | None]]


def rnn(
    input: Tensor,
    weights: RNNWeights,
    h0: Tensor | None = None,
    c0: Tensor | None = None,
    *,
    mode: str,
    num_layers: int = 1,
    bidirectional: bool = False,
    dropout: float = 0.0,
    training: bool = False,
    batch_first: bool = False,
    lengths: Tensor | None = None,
    reset: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """A stacked, optionally bidirectional recurrent network (torch.nn.RNN/GRU/LSTM semantics).

    ``input`` ``(T, B, I)`` (``(B, T, I)`` if ``batch_first``, kept in that layout throughout:
    no transposed copies); ``weights`` one ``(w_ih, w_hh, b_ih, b_hh)`` per layer and direction
    in torch's order (layer-major, forward then reverse); ``h0``/``c0`` ``(num_layers * D, B,
    H)`` or None (zeros); ``lengths`` ``(B,)`` in [1, T] (right padding: outputs past a row's
    length are 0, ``h_n`` is the state at its last step, the reverse direction starts there);
    ``reset`` bool ``(T, B)`` (``(B, T)`` if ``batch_first``) zeroes a row's state before step
    t (both directions, in processing order). Dropout (``dropout`` when ``training``) acts on
    each layer's output but the last. Returns ``(output, h_n, c_n)``; ``c_n`` is None unless
    ``mode == "lstm"``.
    """
    _check_rnn_args(input, weights, mode, num_layers, bidirectional, dropout, 3)
    steps, batch = (input.shape[1], input.shape[0]) if batch_first else input.shape[:2]
    x = input.contiguous()
    h0, c0 = _rnn_states(weights, h0, c0, x, mode, num_layers, bidirectional, batch)
    if lengths is not None:
        lengths = _check_rnn_lengths(lengths, x, batch, steps)
    if reset is not None:
        if not isinstance(reset, Tensor) or reset.dtype != torch.bool:
            raise TypeError(f"reset must be a bool tensor, got {getattr(reset, 'dtype', type(reset))}")
        expected = (batch, steps) if batch_first else (steps, batch)
        if _shape(reset) != expected:
            name = "(B, T)" if batch_first else "(T, B)"
            raise ValueError(f"reset must be {name} = {expected}, got {_shape(reset)}")
        reset = reset.to(x.device).contiguous()
    layout = dict(lengths=lengths, reset=reset, batch_first=batch_first, batch_sizes=None)
    return _rnn_layers(x, weights, h0, c0, mode, num_layers, bidirectional, dropout, training, layout)


def rnn_packed(
    data: Tensor,
    batch_sizes: Tensor,
    weights: RNNWeights,
    h0: Tensor | None = None,
    c0: Tensor | None = None,
    *,
    mode: str,
    num_layers: int = 1,
    bidirectional: bool = False,
    dropout: float = 0.0,
    training: bool = False,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """:func:`rnn` on the fields of a ``PackedSequence``: ``data`` ``(N, I)`` and ``batch_sizes``
    (int64 ``(T,)``, non-increasing), rows in the packed (length-sorted) order, as are ``h0``/
    ``c0`` ``(num_layers * D, batch_sizes[0], H)``. Returns ``(output data (N, D * H), h_n,
    c_n)`` in the same order. Only the real rows are computed: the projections over N rows, and
    step t of the recurrence over its ``batch_sizes[t]`` rows.
    """
    _check_rnn_args(data, weights, mode, num_layers, bidirectional, dropout, 2)
    if not isinstance(batch_sizes, Tensor) or batch_sizes.dtype.is_floating_point or batch_sizes.dim() != 1:
        raise TypeError(f"batch_sizes must be a 1-D integer tensor, got {getattr(batch_sizes, 'shape', batch_sizes)}")
    batch_sizes = batch_sizes.to(device="cpu", dtype=torch.int64).contiguous()
    if batch_sizes.numel() == 0 or int(batch_sizes.sum()) != data.shape[0]:
        raise ValueError(f"batch_sizes must sum to data.size(0) = {data.shape[0]}, got {batch_sizes.tolist()}")
    batch = int(batch_sizes[0])
    x = data.contiguous()
    h0, c0 = _rnn_states(weights, h0, c0, x, mode, num_layers, bidirectional, batch)
    layout = dict(lengths=None, reset=None, batch_first=False, batch_sizes=batch_sizes)
    return _rnn_layers(x, weights, h0, c0, mode, num_layers, bidirectional, dropout, training, layout)


def _check_rnn_args(input, weights, mode, num_layers, bidirectional, dropout, dims) -> None:
    if mode not in _RNN_MODES:
        raise ValueError(f"mode must be one of {_RNN_MODES}, got {mode!r}")
    _check_tensor("input", input)
    if input.dim() != dims:
        expected = "(T, B, input_size) or (B, T, input_size)" if dims == 3 else "(N, input_size)"
        raise ValueError(f"input must be {dims}-D {expected}, got shape {_shape(input)}")
    if input.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"input must be a floating point tensor, got {input.dtype}")
    if not 0.0 <= dropout <= 1.0:
        raise ValueError(f"dropout must be in [0, 1], got {dropout}")
    dirs = 2 if bidirectional else 1
    if len(weights) != num_layers * dirs:
        raise ValueError(f"weights must hold num_layers * directions = {num_layers * dirs} tuples, got {len(weights)}")
    w_ih0, w_hh0 = weights[0][0], weights[0][1]
    gates, hidden, size = _RNN_GATES[mode], w_hh0.shape[1], input.shape[-1]
    if w_ih0.shape[1] != size:
        raise ValueError(f"input.size(-1) must equal input_size = {w_ih0.shape[1]}, got {size}")
    if w_ih0.shape[0] != gates * hidden:
        raise ValueError(f"weight_ih must be ({gates * hidden}, input_size) for mode {mode!r}, got {_shape(w_ih0)}")


def _rnn_states(weights, h0, c0, x, mode, num_layers, bidirectional, batch) -> tuple[Tensor, Tensor | None]:
    """Checked ``(h0, c0)`` of shape ``(num_layers * D, B, H)``, zeros where not given."""
    hidden = weights[0][1].shape[1]
    state_shape = (num_layers * (2 if bidirectional else 1), batch, hidden)
    for name, t in (("h0", h0), ("c0", c0)):
        if t is None:
            continue
        if name == "c0" and mode != "lstm":
            raise ValueError(f"c0 is only for mode 'lstm', got mode {mode!r}")
        _check_tensor(name, t)
        if _shape(t) != state_shape:
            raise ValueError(
                f"{name} must be (num_layers * directions, batch, hidden) = {state_shape}, got {_shape(t)}"
            )
        if t.dtype != x.dtype or t.device != x.device:
            raise TypeError(f"{name} must have input's dtype and device ({x.dtype}, {x.device})")
    if h0 is None:
        h0 = x.new_zeros(state_shape)
    if mode == "lstm" and c0 is None:
        c0 = x.new_zeros(state_shape)
    return h0, c0


def _rnn_layers(x, weights, h0, c0, mode, num_layers, bidirectional, dropout, training, layout):
    dirs = 2 if bidirectional else 1
    h_n, c_n = [], []
    for layer in range(num_layers):
        outs = []
        for d in range(dirs):
            k = layer * dirs + d
            w_ih, w_hh, b_ih, b_hh = weights[k]
            out, h, c = rnn_ops.rnn_layer(
                x,
                h0[k],
                c0[k] if mode == "lstm" else None,
                w_ih,
                w_hh,
                b_ih,
                b_hh,
                layout["lengths"],
                layout["reset"],
                mode,
                d == 1,
                batch_first=layout["batch_first"],
                batch_sizes=layout["batch_sizes"],
            )
            outs.append(out)
            h_n.append(h)
            c_n.append(c)
        x = outs[0] if dirs == 1 else torch.cat(outs, dim=-1)
        if training and dropout > 0.0 and layer < num_layers - 1:
            x = torch.nn.functional.dropout(x, dropout, training=True)
    return x, torch.stack(h_n), torch.stack(c_n) if mode == "lstm" else None


def _check_rnn_lengths(lengths: Tensor, x: Tensor, batch: int, steps: int) -> Tensor:
    if not isinstance(lengths, Tensor) or lengths.dtype.is_floating_point or lengths.dtype == torch.bool:
        raise TypeError(f"lengths must be an integer tensor, got {getattr(lengths, 'dtype', type(lengths))}")
    if _shape(lengths) != (batch,):
        raise ValueError(f"lengths must be (batch,) = ({batch},), got {_shape(lengths)}")
    if not torch.compiler.is_compiling() and lengths.numel() > 0:
        if lengths.device.type != "cpu":
            # No host sync for device lengths: checked on the device (an error at the next sync);
            # the kernels clamp them to [0, T] meanwhile.
            torch._assert_async(((lengths >= 1) & (lengths <= steps)).all(), f"lengths must lie in [1, T = {steps}]")
        else:
            low, high = int(lengths.min()), int(lengths.max())
            if low < 1 or high > steps:
                raise ValueError(f"lengths must lie in [1, T = {steps}], got values in [{low}, {high}]")
    return lengths.to(device=x.device, dtype=torch.int32).contiguous()


def rnn_tanh_cell(
    input: Tensor, hx: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor | None = None, b_hh: Tensor | None = None
) -> Tensor:
    """One Elman step, ``tanh(x W_ih^T + b_ih + h W_hh^T + b_hh)`` (``torch.rnn_tanh_cell``);
    ``input`` ``(B, I)``, ``hx`` ``(B, H)``; one fused op forward and one backward on CPU."""
    return _cell("tanh", input, hx, None, w_ih, w_hh, b_ih, b_hh)[0]


def rnn_relu_cell(
    input: Tensor, hx: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor | None = None, b_hh: Tensor | None = None
) -> Tensor:
    """One Elman step with ReLU (``torch.rnn_relu_cell``); see :func:`rnn_tanh_cell`."""
    return _cell("relu", input, hx, None, w_ih, w_hh, b_ih, b_hh)[0]


def gru_cell(
    input: Tensor, hx: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor | None = None, b_hh: Tensor | None = None
) -> Tensor:
    """One GRU step with PyTorch's equations (gates r, z, n; ``b_hn`` inside the reset
    product), as ``torch.gru_cell``; ``input`` ``(B, I)``, ``hx`` ``(B, H)``."""
    return _cell("gru", input, hx, None, w_ih, w_hh, b_ih, b_hh)[0]


def lstm_cell(
    input: Tensor,
    hx: tuple[Tensor, Tensor],
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Tensor | None = None,
    b_hh: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """One LSTM step (gates i, f, g, o), as ``torch.lstm_cell``: ``hx = (h, c)`` each ``(B, H)``;
    returns ``(h_new, c_new)``."""
    if not isinstance(hx, (tuple, list)) or len(hx) != 2:
        raise TypeError(f"hx must be a tuple (h, c), got {type(hx).__name__}")
    h, c = _cell("lstm", input, hx[0], hx[1], w_ih, w_hh, b_ih, b_hh)
    return h, c


def _cell(mode, input, h, c, w_ih, w_hh, b_ih, b_hh):
    names = [("input", input), ("hx", h), ("weight_ih", w_ih), ("weight_hh", w_hh)]
    names += [("cx", c)] if mode == "lstm" else []
    for name, t in names:
        _check_tensor(name, t)
    if input.dim() != 2:
        raise ValueError(f"input must be 2-D (batch, input_size), got shape {_shape(input)}")
    if input.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"input must be a floating point tensor, got {input.dtype}")
    batch, size = input.shape
    gates, hidden = _RNN_GATES[mode], w_hh.shape[-1]
    if _shape(w_hh) != (gates * hidden, hidden):
        raise ValueError(f"weight_hh must be (gates * hidden, hidden) = {(gates * hidden, hidden)}, got {_shape(w_hh)}")
    if _shape(w_ih) != (gates * hidden, size):
        expected = (gates * hidden, size)
        raise ValueError(f"weight_ih must be (gates * hidden, input_size) = {expected}, got {_shape(w_ih)}")
    if (b_ih is None) != (b_hh is None):
        raise ValueError("b_ih and b_hh must be given together or both be None")
    for name, t in (("b_ih", b_ih), ("b_hh", b_hh)):
        if t is not None and _shape(t) != (gates * hidden,):
            raise ValueError(f"{name} must be ({gates * hidden},), got {_shape(t)}")
    for name, t in (("hx", h), ("cx", c)):
        if t is None:
            continue
        if _shape(t) != (batch, hidden):
            raise ValueError(f"{name} must be (batch, hidden) = {(batch, hidden)}, got {_shape(t)}")
    for name, t in [("hx", h), ("cx", c), ("weight_ih", w_ih), ("weight_hh", w_hh), ("b_ih", b_ih), ("b_hh", b_hh)]:
        if t is not None and (t.dtype != input.dtype or t.device != input.device):
            raise TypeError(f"{name} must have input's dtype and device ({input.dtype}, {input.device})")
    return rnn_ops.rnn_cell(input, h, c, w_ih, w_hh, b_ih, b_hh, mode)


# =============================================================================================
# conv: conv1d / conv2d with a fused activation and max-pool
# =============================================================================================
def conv2d(
    input: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride: int | tuple[int, int] = 1,
    padding: str | int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
    groups: int = 1,
    *,
    act: str = "none",
    pool: int | tuple[int, int] = 1,
) -> Tensor:
    """``F.conv2d`` (same arguments) followed by ``act`` and a ``pool x pool`` max-pool with
    stride ``pool`` (``F.max_pool2d(a, pool)``), fused: the conv output is never written.

    ``act`` is one of ``"none"``, ``"relu"``, ``"gelu"`` (exact), ``"tanh"``, ``"sigmoid"``;
    ``pool=1`` means no pool. Input ``(N, C, H, W)`` or unbatched ``(C, H, W)``.
    """
    return _conv(input, weight, bias, stride, padding, dilation, groups, act, pool, 2)


def conv1d(
    input: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride: int | tuple[int] = 1,
    padding: str | int | tuple[int] = 0,
    dilation: int | tuple[int] = 1,
    groups: int = 1,
    *,
    act: str = "none",
    pool: int | tuple[int] = 1,
) -> Tensor:
    """``F.conv1d`` (same arguments) followed by ``act`` and ``F.max_pool1d(a, pool)``, fused.

    Input ``(N, C, L)`` or unbatched ``(C, L)``; ``pool`` equal to the output length is
    max-over-time.
    """
    return _conv(input, weight, bias, stride, padding, dilation, groups, act, pool, 1)


def _conv(input, weight, bias, stride, padding, dilation, groups, act, pool, dims: int) -> Tensor:
    """conv1d / conv2d: validate in torch's argument forms, then the canonical 2-D op."""
    fn = f"conv{dims}d"
    for name, t in (("input", input), ("weight", weight)):
        _check_tensor(name, t)
    if weight.dim() != dims + 2:
        raise ValueError(
            f"weight must be {dims + 2}-D (out_channels, in_channels / groups, *kernel), got shape {_shape(weight)}"
        )
    if input.dim() not in (dims + 1, dims + 2):
        raise ValueError(
            f"input must be {dims + 2}-D (N, C, *spatial) or {dims + 1}-D unbatched for {fn}, got shape {_shape(input)}"
        )
    if input.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"input must be float16, bfloat16, float32 or float64, got {input.dtype}")
    if weight.dtype != input.dtype or weight.device != input.device:
        raise TypeError(
            f"weight must have input's dtype and device ({input.dtype}, {input.device}), "
            f"got ({weight.dtype}, {weight.device})"
        )
    if not isinstance(groups, int) or isinstance(groups, bool) or groups < 1:
        raise ValueError(f"groups must be a positive int, got {groups!r}")
    if act not in ACTIVATIONS:
        raise ValueError(f"act must be one of {ACTIVATIONS}, got {act!r}")
    stride = _int_tuple("stride", stride, dims, 1)
    dilation = _int_tuple("dilation", dilation, dims, 1)
    pool = _int_tuple("pool", pool, dims, 1)
    unbatched = input.dim() == dims + 1
    x = input.unsqueeze(0) if unbatched else input
    out_channels, in_per_group = weight.shape[0], weight.shape[1]
    if x.shape[1] != in_per_group * groups:
        raise ValueError(
            f"input must have weight.size(1) * groups = {in_per_group * groups} channels, got {x.shape[1]} "
            f"(input {_shape(input)}, weight {_shape(weight)}, groups {groups})"
        )
    if out_channels % groups != 0:
        raise ValueError(f"weight.size(0) = {out_channels} out_channels must be divisible by groups = {groups}")
    if bias is not None:
        if not isinstance(bias, Tensor):
            raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
        if _shape(bias) != (out_channels,):
            raise ValueError(f"bias must be (out_channels,) = ({out_channels},), got {_shape(bias)}")
        if bias.dtype != input.dtype or bias.device != input.device:
            raise TypeError(f"bias must have input's dtype and device ({input.dtype}, {input.device})")
    kernel = tuple(weight.shape[2:])
    spatial = tuple(x.shape[2:])
    if isinstance(padding, str):
        if padding == "valid":
            before, after = (0,) * dims, (0,) * dims
        elif padding == "same":
            if any(s != 1 for s in stride):
                raise ValueError(f"padding='same' needs stride 1, got stride {stride}")
            total = tuple(d * (k - 1) for d, k in zip(dilation, kernel, strict=True))
            before = tuple(t // 2 for t in total)
            after = tuple(t - t // 2 for t in total)
        else:
            raise ValueError(f"padding must be 'same', 'valid', an int or a tuple of {dims} ints, got {padding!r}")
    else:
        before = after = _int_tuple("padding", padding, dims, 0)
    padded = tuple(s + a + b for s, a, b in zip(spatial, before, after, strict=True))
    reach = tuple(d * (k - 1) + 1 for d, k in zip(dilation, kernel, strict=True))
    if any(r > p for r, p in zip(reach, padded, strict=True)):
        raise ValueError(f"weight's kernel {kernel} (dilated extent {reach}) is larger than the padded input {padded}")
    conv_out = tuple((p - r) // s + 1 for p, r, s in zip(padded, reach, stride, strict=True))
    if any(k > c for k, c in zip(pool, conv_out, strict=True)):
        raise ValueError(f"pool {pool} is larger than the convolution output {conv_out}")
    if after != before:  # 'same' with an even extent: torch pads the extra element at the end
        extra = [a - b for a, b in zip(after, before, strict=True)]
        x = F.pad(x, [v for e in reversed(extra) for v in (0, e)])
    if (dtype := backends.autocast_dtype(x.device.type)) is not None:
        x, weight = x.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    if dims == 1:
        x, weight = x.unsqueeze(2), weight.unsqueeze(2)
        stride, dilation, pool = ((1, *v) for v in (stride, dilation, pool))
        before = (0, *before)
    y = conv_ops.conv(x, weight, bias, stride, before, dilation, groups, act, pool)
    if dims == 1:
        y = y.squeeze(2)
    return y.squeeze(0) if unbatched else y


def _int_tuple(name: str, value, dims: int, minimum: int) -> tuple[int, ...]:
    """An int or a ``dims``-tuple of ints, each ``>= minimum``, as a tuple."""
    if type(value) is int and value >= minimum:  # the common case, checked cheaply (per call)
        return (value,) * dims
    values = (value,) * dims if isinstance(value, int) and not isinstance(value, bool) else value
    if (
        not isinstance(values, (tuple, list))
        or len(values) != dims
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in values)
    ):
        raise TypeError(f"{name} must be an int or a tuple of {dims} ints, got {value!r}")
    if any(v < minimum for v in values):
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return tuple(values)


# =============================================================================================
# caser: Caser's convolution block
# =============================================================================================
def caser(
    E: Tensor,
    w_h: Sequence[Tensor],
    b_h: Sequence[Tensor] | None,
    w_v: Tensor,
    b_v: Tensor | None,
    act_h: str = "relu",
    act_v: str = "none",
) -> tuple[Tensor, Tensor]:
    """Caser's convolution block on item embeddings ``E`` ``(B, L, d)`` (or ``(B, 1, L, d)``).

    ``w_h[k]`` ``(nh, 1, k+1, d)`` and ``b_h[k]`` ``(nh,)`` are the weight and bias of the
    height-(k+1) horizontal ``nn.Conv2d(1, nh, (k+1, d))``, k = 0..L-1; ``w_v`` ``(nv, 1, L, 1)``
    and ``b_v`` ``(nv,)`` the vertical ``nn.Conv2d(1, nv, (L, 1))``. Returns ``out_h``
    ``(B, L * nh)``: per height, ``act_h`` then max over time, concatenated over heights; and
    ``out_v`` ``(B, nv * d)``: ``act_v`` of the vertical conv, flattened as ``.view(B, -1)``.
    All heights run in one fused launch, forward and backward.
    """
    _check_tensor("E", E)
    if E.dim() == 4 and E.shape[1] == 1:
        E = E.squeeze(1)
    if E.dim() != 3:
        raise ValueError(f"E must be (B, L, d) or (B, 1, L, d), got shape {_shape(E)}")
    if E.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"E must be float16, bfloat16, float32 or float64, got {E.dtype}")
    batch, length, dim = E.shape
    if length < 1 or dim < 1:
        raise ValueError(f"E must have L >= 1 and d >= 1, got shape {_shape(E)}")
    for name, act in (("act_h", act_h), ("act_v", act_v)):
        if act not in ACTIVATIONS:
            raise ValueError(f"{name} must be one of {ACTIVATIONS}, got {act!r}")
    if isinstance(w_h, Tensor) or not isinstance(w_h, Sequence):
        raise TypeError(f"w_h must be a sequence of L = {length} tensors, got {type(w_h).__name__}")
    if len(w_h) != length:
        raise ValueError(f"w_h must hold L = {length} tensors (heights 1..L), got {len(w_h)}")
    filters = _check_caser_weight("w_h[0]", w_h[0], E, None, 1, dim)
    # One pass over the heights when everything is right (per-call cost); the per-tensor checks,
    # with their messages, only when something is not.
    if not _all_match(w_h, [(filters, 1, k + 1, dim) for k in range(length)], E):
        for k in range(1, length):
            _check_caser_weight(f"w_h[{k}]", w_h[k], E, filters, k + 1, dim)
    if b_h is not None:
        if isinstance(b_h, Tensor) or not isinstance(b_h, Sequence) or len(b_h) != length:
            raise TypeError(f"b_h must be None or a sequence of L = {length} tensors, got {type(b_h).__name__}")
        if not _all_match(b_h, [(filters,)] * length, E):
            for k in range(length):
                _check_caser_bias(f"b_h[{k}]", b_h[k], E, filters)
    vertical = _check_caser_weight("w_v", w_v, E, None, length, 1)
    if b_v is not None:
        _check_caser_bias("b_v", b_v, E, vertical)

    if (dtype := backends.autocast_dtype(E.device.type)) is not None:
        E, w_v = E.to(dtype), w_v.to(dtype)
        w_h = [w.to(dtype) for w in w_h]
        b_h = None if b_h is None else [b.to(dtype) for b in b_h]
        b_v = None if b_v is None else b_v.to(dtype)
    return caser_ops.caser(E, tuple(w_h), None if b_h is None else tuple(b_h), w_v, b_v, act_h, act_v)


def _all_match(tensors: Sequence[Tensor], shapes: list[tuple[int, ...]], E: Tensor) -> bool:
    """Every entry is a tensor of its shape in ``shapes`` with E's dtype and device."""
    try:
        return [t.shape for t in tensors] == shapes and all(
            t.dtype == E.dtype and t.device == E.device for t in tensors
        )
    except AttributeError:  # not a tensor: the per-tensor checks say which
        return False


def _check_caser_weight(name: str, w: Tensor, E: Tensor, out: int | None, height: int, width: int) -> int:
    """Checks a (out, 1, height, width) conv weight against E; returns its out channels."""
    _check_tensor(name, w)
    expected = (out if out is not None else w.shape[0] if w.dim() == 4 else "n", 1, height, width)
    if w.dim() != 4 or w.shape[1:] != (1, height, width) or (out is not None and w.shape[0] != out):
        raise ValueError(f"{name} must be (out, 1, height, width) = {expected}, got {_shape(w)}")
    if w.shape[0] < 1:
        raise ValueError(f"{name} must have at least one filter, got shape {_shape(w)}")
    if w.dtype != E.dtype:
        raise TypeError(f"{name} must have E's dtype {E.dtype}, got {w.dtype}")
    if w.device != E.device:
        raise ValueError(f"{name} must be on E's device {E.device}, got {w.device}")
    return w.shape[0]


def _check_caser_bias(name: str, b: Tensor, E: Tensor, out: int) -> None:
    if not isinstance(b, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(b).__name__}")
    if _shape(b) != (out,):
        raise ValueError(f"{name} must be ({out},), got {_shape(b)}")
    if b.dtype != E.dtype:
        raise TypeError(f"{name} must have E's dtype {E.dtype}, got {b.dtype}")
    if b.device != E.device:
        raise ValueError(f"{name} must be on E's device {E.device}, got {b.device}")


# =============================================================================================
# dropout
# =============================================================================================
def dropout(input: Tensor, p: float = 0.5, training: bool = True, inplace: bool = False) -> Tensor:
    """``F.dropout`` through fastrec: each element is zeroed with probability ``p`` and the
    others scaled by ``1 / (1 - p)``. Not training or ``p == 0``: ``input`` itself.
    ``inplace=True`` runs ``F.dropout`` (counted in ``fastrec.stats()``).

    Masks (``fastrec.use_dropout_stream``): the default stream, ``"auto"``, takes torch's masks,
    on the CPU with ``F.dropout``'s own output, gradient and generator state (drawn bit for bit
    by fastrec, csrc/dropout.cpp) and on CUDA by running ``F.dropout`` itself (torch's kernel
    launches faster at recommender sizes); fastrec's Philox masks only where a backend is forced
    on CUDA or the triton backend on the CPU. Philox masks are drawn in one fused pass with no
    mask tensor, and the backward recomputes them from a seed drawn from torch's generator, so
    ``torch.manual_seed`` makes runs reproducible. ``"fastrec"`` draws Philox masks wherever
    fastrec's kernels run, ``"torch"`` torch's masks everywhere.
    """
    _check_tensor("input", input)
    dropout_ops.check_p(p)
    if inplace and training and p > 0.0:
        backends.count(dropout_ops.OP, "torch", "inplace=True")
        return F.dropout(input, p, training, inplace=True)
    return dropout_ops.dropout(input, p, training)


# =============================================================================================
# sampled_softmax: sampled losses over a large class table
# =============================================================================================
def sampled_softmax_loss(
    h: Tensor,
    W: Tensor,
    target: Tensor,
    n_negatives: int,
    *,
    sampler: str = "uniform",
    frequency: Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    generator: torch.Generator | None = None,
) -> Tensor:
    """Sampled softmax cross-entropy with the log-Q correction, the cheap stand-in for
    ``F.cross_entropy(h @ W.T, target)`` over a large table.

    ``h`` (R, d), ``W`` (V, d) (class c is row c), ``target`` (R,) long in 0..V-1 or
    ``ignore_index``. ``sampler``: ``"uniform"`` or ``"popularity"`` (draws ``n_negatives``
    classes, with replacement, uniformly or in proportion to ``frequency`` (V,)) or
    ``"in-batch"`` (``n_negatives=0``: the other rows' targets only). One set of negatives is
    shared by every row and drawn from torch's RNG (``generator`` or the default). Candidates
    are the distinct classes among the targets and the negatives (so the other rows' targets are
    negatives too, and a negative equal to a row's target is never counted against it); each
    logit is corrected by ``-log`` of its expected count among them (``fastrec.ops.sampled_softmax``).
    """
    _check_sampled("sampled_softmax_loss", h, W, target, n_negatives, sampler, frequency, reduction)
    negatives, q = sampled_ops.draw_negatives(n_negatives, W.shape[0], sampler, frequency, generator, h.device)
    return sampled_ops.sampled_softmax(h, W, target, negatives, q, ignore_index, reduction)


def gbce_loss(
    h: Tensor,
    W: Tensor,
    target: Tensor,
    n_negatives: int,
    *,
    t: float = 0.75,
    sampler: str = "uniform",
    frequency: Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    generator: torch.Generator | None = None,
) -> Tensor:
    """gBCE (gSASRec; Petrov & Macdonald, RecSys 2023): binary cross-entropy of the target
    against ``n_negatives`` sampled classes with the positive's log-sigmoid scaled by
    ``beta = alpha * (t * (1 - 1 / alpha) + 1 / alpha)``, ``alpha = n_negatives / (V - 1)``, which
    counters the overconfidence negative sampling teaches. ``t`` in [0, 1]: 0 is plain BCE, the
    paper's default is 0.75. Per row ``beta * softplus(-s+) + sum_j softplus(s_j)`` over the shared
    negatives (``"uniform"`` or ``"popularity"``) other than the row's target; arguments as
    ``sampled_softmax_loss``.
    """
    _check_sampled("gbce_loss", h, W, target, n_negatives, sampler, frequency, reduction)
    if sampler == "in-batch":
        raise ValueError("gbce_loss: sampler must be 'uniform' or 'popularity', got 'in-batch'")
    if not isinstance(t, (int, float)) or not 0.0 <= t <= 1.0:
        raise ValueError(f"t must be a float in [0, 1], got {t!r}")
    if W.shape[0] < 2:
        raise ValueError(f"W must have at least 2 rows (classes) for gbce_loss, got {W.shape[0]}")
    beta = sampled_ops.gbce_beta(n_negatives, W.shape[0], float(t))
    negatives, _ = sampled_ops.draw_negatives(n_negatives, W.shape[0], sampler, frequency, generator, h.device)
    return sampled_ops.gbce(h, W, target, negatives, beta, ignore_index, reduction)


def _check_sampled(fn, h, W, target, n_negatives, sampler, frequency, reduction) -> None:
    for name, t in (("h", h), ("W", W), ("target", target)):
        _check_tensor(name, t)
    if h.dim() != 2 or W.dim() != 2 or h.shape[1] != W.shape[1]:
        raise ValueError(f"{fn}: h must be (R, d) and W (V, d) with the same d, got {_shape(h)} and {_shape(W)}")
    if W.shape[0] < 1:
        raise ValueError(f"{fn}: W must have at least one row (class), got {_shape(W)}")
    if h.dtype not in _FLOAT_DTYPES or W.dtype != h.dtype:
        raise TypeError(f"{fn}: h and W must share a float dtype, got {h.dtype} and {W.dtype}")
    if W.device != h.device or target.device != h.device:
        raise ValueError(f"{fn}: h, W and target must be on one device, got {h.device}, {W.device}, {target.device}")
    if target.dtype != torch.long or target.shape != (h.shape[0],):
        raise ValueError(f"{fn}: target must be ({h.shape[0]},) long, got {_shape(target)} {target.dtype}")
    if sampler not in sampled_ops.SAMPLERS:
        raise ValueError(f"{fn}: sampler must be one of {sampled_ops.SAMPLERS}, got {sampler!r}")
    if reduction not in sampled_ops.REDUCTIONS:
        raise ValueError(f"{fn}: reduction must be one of {sampled_ops.REDUCTIONS}, got {reduction!r}")
    if not isinstance(n_negatives, int) or isinstance(n_negatives, bool) or n_negatives < 0:
        raise ValueError(f"{fn}: n_negatives must be an int >= 0, got {n_negatives!r}")
    if sampler == "in-batch" and n_negatives != 0:
        raise ValueError(f"{fn}: n_negatives must be 0 with sampler='in-batch', got {n_negatives}")
    if sampler != "in-batch" and n_negatives < 1:
        raise ValueError(f"{fn}: n_negatives must be >= 1 with sampler={sampler!r}, got {n_negatives}")
    if sampler == "popularity":
        if not isinstance(frequency, Tensor) or frequency.shape != (W.shape[0],):
            raise ValueError(f"{fn}: frequency must be a ({W.shape[0]},) tensor for sampler='popularity'")
        if bool((frequency < 0).any()) or not bool(frequency.sum() > 0):
            raise ValueError(f"{fn}: frequency must be non-negative with a positive sum")
    elif frequency is not None:
        raise ValueError(f"{fn}: frequency is for sampler='popularity', got sampler={sampler!r}")


# scoring
# =============================================================================================
def topk_scores(h: Tensor, W: Tensor, k: int, *, exclude=None) -> tuple[Tensor, Tensor]:
    """The ``k`` best items of each row: ``(scores (B, k), items (B, k) int64)``, as ``torch.topk``
    returns (values, indices), best first, without forming the (B, V) score matrix.

    ``h`` (B, d) against every row of ``W`` (V, d): item j scores ``h[b] . W[j]``. ``exclude``
    (the items a row must not get, e.g. those a user has seen): one 1-D int sequence (list, numpy
    array or tensor) per row, or a (B, E) int tensor; ids < 0 are padding and ignored, the rest
    must lie in ``[0, V)``. Excluded items score ``-inf`` (they come last, and only if ``k``
    exceeds the items left). Equal scores: the lower item index first (``torch.topk``'s own order
    among equal scores is unspecified). Small CPU catalogues run ``(h @ W.T).topk(k)`` itself
    (``fastrec.routing``). No gradient flows.
    """
    V = _check_scoring(h, W)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= V:
        raise ValueError(f"k must be an int in 1..{V} (the rows of W), got {k!r}")
    offsets, ids = scoring_ops.exclusions(exclude, h.shape[0], V, h.device)
    return scoring_ops.topk(h, W, k, offsets, ids)


def target_ranks(h: Tensor, W: Tensor, target: Tensor, *, exclude=None) -> Tensor:
    """1-based rank (B,) int64 of each row's ``target`` item among all rows of ``W`` (V, d) for
    full-ranking metrics, without forming the (B, V) score matrix: ``1 +`` the number of other
    items that score at least the target's score (ties count against the target), leaving out
    the row's ``exclude`` items (as in :func:`topk_scores`; the target itself always counts).
    A row with a NaN score gets 0. Memory O(B) beyond one item tile per worker."""
    V = _check_scoring(h, W)
    _check_tensor("target", target)
    if target.shape != (h.shape[0],) or target.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"target must be int (B,) = ({h.shape[0]},), got {target.dtype} {_shape(target)}")
    target = target.to(h.device, torch.long)
    if target.numel() and (int(target.min()) < 0 or int(target.max()) >= V):
        raise ValueError(f"target items must lie in 0..{V - 1}, got {int(target.min())}..{int(target.max())}")
    offsets, ids = scoring_ops.exclusions(exclude, h.shape[0], V, h.device)
    ranks, ranks_excluded = scoring_ops.ranks(h, W, target, offsets, ids)
    return ranks if exclude is None else ranks_excluded


def _check_scoring(h: Tensor, W: Tensor) -> int:
    """Check ``h`` (B, d) and ``W`` (V, d); returns V."""
    _check_tensor("h", h)
    _check_tensor("W", W)
    if h.dim() != 2 or h.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"h must be a floating (B, d) tensor, got {h.dtype} {_shape(h)}")
    if W.dim() != 2 or W.shape[1] != h.shape[1] or W.shape[0] < 1:
        raise ValueError(f"W must be (V, d) = (V, {h.shape[1]}) with V >= 1, got {_shape(W)}")
    if W.dtype != h.dtype or W.device != h.device:
        raise ValueError(f"W must match h's dtype and device ({h.dtype}, {h.device}), got {W.dtype}, {W.device}")
    return W.shape[0]


# linear cross-entropy
# =============================================================================================
def linear_cross_entropy(
    h: Tensor,
    W: Tensor,
    target: Tensor,
    *,
    bias: Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
) -> Tensor:
    """``F.cross_entropy(F.linear(h, W, bias), target, ...)`` without the ``(rows, items)`` logits.

    h ``(..., d)`` (or ``(d,)``), W ``(V, d)``, bias ``(V,)`` or None, target int64 of h's leading
    shape with values in ``[0, V)`` or ``ignore_index``. ``reduction`` "mean" (over the rows not
    ignored: NaN when every row is), "sum" or "none" (the loss per row, zero where ignored, of
    target's shape); ``label_smoothing`` in [0, 1] as torch defines it. On the CPU the C++ kernel
    runs item tiles with an online log-sum-exp (float32 / float64), on CUDA the Triton kernels;
    small catalogues run torch's dense path (``fastrec.routing``). Ignored rows get a zero
    gradient. On CUDA (and under ``torch.compile``) nothing is read back to the host, so the call
    can be captured in a CUDA graph; the target range is then checked by a device-side assert.
    """
    _check_tensor("h", h)
    _check_tensor("W", W)
    _check_tensor("target", target)
    if h.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"h must be float16, bfloat16, float32 or float64, got {h.dtype}")
    if h.dim() < 1:
        raise ValueError(f"h must be (..., d), got shape {_shape(h)}")
    if W.dim() != 2 or W.shape[1] != h.shape[-1]:
        raise ValueError(f"W must be (V, d) with d = h's last dimension {h.shape[-1]}, got shape {_shape(W)}")
    if W.dtype != h.dtype:
        raise TypeError(f"W must have h's dtype {h.dtype}, got {W.dtype}")
    if W.device != h.device:
        raise ValueError(f"W must be on h's device {h.device}, got {W.device}")
    if bias is not None:
        _check_tensor("bias", bias)
        if _shape(bias) != (W.shape[0],):
            raise ValueError(f"bias must be (V,) = ({W.shape[0]},), got shape {_shape(bias)}")
        if bias.dtype != h.dtype:
            raise TypeError(f"bias must have h's dtype {h.dtype}, got {bias.dtype}")
        if bias.device != h.device:
            raise ValueError(f"bias must be on h's device {h.device}, got {bias.device}")
    if target.dtype != torch.int64:
        raise TypeError(f"target must be an int64 tensor of class indices, got {target.dtype}")
    if _shape(target) != _shape(h)[:-1]:
        raise ValueError(f"target must have h's leading shape {_shape(h)[:-1]}, got {_shape(target)}")
    if target.device != h.device:
        raise ValueError(f"target must be on h's device {h.device}, got {target.device}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
    if reduction not in lce_ops.REDUCTIONS:
        raise ValueError(f"reduction must be one of {lce_ops.REDUCTIONS}, got {reduction!r}")
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, (int, float)):
        raise TypeError(f"label_smoothing must be a float, got {label_smoothing!r}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    rows = h.reshape(-1, h.shape[-1])
    flat = target.reshape(-1)
    lce_ops.check_targets(flat, W.shape[0], ignore_index, h.device.type != "cpu" or torch.compiler.is_compiling())
    loss = lce_ops.linear_cross_entropy(rows, W, flat, bias, ignore_index, reduction, float(label_smoothing))
    return loss.view(target.shape) if reduction == "none" else loss
