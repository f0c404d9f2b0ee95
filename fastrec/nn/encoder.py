"""Drop-in transformer encoder layer: a subclass of ``torch.nn.TransformerEncoderLayer``.

Only ``forward`` is overridden, so constructor, defaults, initialisation, parameters and
``state_dict`` are torch's by construction. Its attention is ``fastrec.nn.MultiheadAttention``
and its dropouts ``fastrec.nn.Dropout``; at inference on the CPU the whole layer is the encoder
op (``fastrec.ops.encoder``), and in training on CUDA (or under a forced triton backend) the
fused training op ``fastrec.ops.encoder.encoder_layer``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastrec import backends
from fastrec.nn.attention import MultiheadAttention, _is_causal_mask
from fastrec.nn.dropout import Dropout
from fastrec.ops import encoder as encoder_ops


class TransformerEncoderLayer(torch.nn.TransformerEncoderLayer):
    """``torch.nn.TransformerEncoderLayer`` whose self-attention is fastrec's (the SASRec /
    BERT4Rec block). Same constructor, parameters and ``state_dict``; torch's layer calls its
    attention with ``need_weights=False``, so the fused path runs, and its dropouts are
    ``fastrec.nn.Dropout``. At inference on the CPU (no autograd, dropout off, no key padding
    mask, no mask or the causal one, ReLU or GELU) the whole layer is the encoder op
    (``fastrec.ops.encoder``: one C++ call), for serving at small batches. In training (or with
    autograd) on CUDA, or under a forced triton backend, the layer is the fused training op
    (``fastrec.ops.encoder.encoder_layer``: a few launches forward and backward, Philox dropout
    masks equal to the unfused layer's for the same seed) when it covers the call (ReLU/GELU, no
    mask or the causal one, a bool key padding mask, in_proj without bias_k / zero attention, the
    widths its kernels cover, not under torch's dropout stream); otherwise torch's forward with the fused ops inside,
    counted in ``fastrec.stats()`` under ``encoder_layer`` with the reason."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.self_attn.__class__ = MultiheadAttention
        for module in (self.dropout, self.dropout1, self.dropout2):  # fastrec's fused dropout
            module.__class__ = Dropout

    def forward(
        self,
        src: Tensor,
        src_mask: Tensor | None = None,
        src_key_padding_mask: Tensor | None = None,
        is_causal: bool = False,
    ) -> Tensor:
        causal = self._inference_op_causal(src, src_mask, src_key_padding_mask, is_causal)
        if causal is None:
            fused = self._training_op(src, src_mask, src_key_padding_mask, is_causal)
            if fused is not None:
                return fused
            return super().forward(src, src_mask, src_key_padding_mask, is_causal)
        attn = self.self_attn
        weights = encoder_layer_weights(self)
        batched = src.dim() == 3
        batch_first = self.self_attn.batch_first
        x = src if not batched or batch_first else src.transpose(0, 1)
        x = x if batched else x.unsqueeze(0)
        y = encoder_ops.encoder_inference(
            x.contiguous(), weights, attn.num_heads, self.norm1.eps, self.norm2.eps,
            self.activation_relu_or_gelu == 2, self.norm_first, causal,
        )  # fmt: skip
        y = y if batched else y.squeeze(0)
        return y if not batched or batch_first else y.transpose(0, 1)

    def _inference_op_causal(self, src, src_mask, src_key_padding_mask, is_causal) -> bool | None:
        """Whether the serving op runs this call causally, or None when torch's forward runs it."""
        if not encoder_ops.HAVE_CPP or not isinstance(src, Tensor):
            return None
        if src.device.type != "cpu" or src.dim() not in (2, 3):
            return None
        if src.dtype not in (torch.float32, torch.float64) or self.activation_relu_or_gelu == 0:
            return None
        if src_key_padding_mask is not None or (self.training and self.dropout.p > 0):
            return None
        if torch.is_grad_enabled() and (src.requires_grad or any(p.requires_grad for p in self.parameters())):
            return None
        attn = self.self_attn
        if (
            attn.in_proj_weight is None
            or attn.bias_k is not None
            or attn.add_zero_attn
            or attn.in_proj_weight.dtype != src.dtype
        ):
            return None
        if backends.select(src.device) != "cpp":
            return None
        if src_mask is None:
            return False if not is_causal else None
        length = src.shape[1] if src.dim() == 3 and attn.batch_first else src.shape[0]
        if src_mask.dim() == 2 and (is_causal or _is_causal_mask(src_mask, length, length)):
            return True
        return None

    def _training_op(self, src, src_mask, src_key_padding_mask, is_causal) -> Tensor | None:
        """The fused training op's output, or None (counted with the reason) when torch's forward
        runs the call. Only calls that train or need autograd are candidates."""
        if not isinstance(src, Tensor) or src.dim() not in (2, 3) or src.is_nested:
            return None
        grad = torch.is_grad_enabled() and (src.requires_grad or any(p.requires_grad for p in self.parameters()))
        if not (grad or (self.training and self.dropout.p > 0)):
            return None
        reason = self._training_op_reason(src, src_mask, src_key_padding_mask, is_causal)
        if reason is not None:
            backends.count(encoder_ops.TRAIN_OP, "torch", reason)
            return None
        attn = self.self_attn
        batched = src.dim() == 3
        batch_first = attn.batch_first or not batched
        x = src if batched else src.unsqueeze(0)
        kpm = src_key_padding_mask
        if kpm is not None and not batched:
            kpm = kpm.unsqueeze(0)
        training = self.training
        ps = tuple(m.p if training else 0.0 for m in (self.dropout1, self.dropout, self.dropout2))
        y = encoder_ops.encoder_layer(
            x, encoder_layer_weights(self), attn.num_heads, self.norm1.eps, self.norm2.eps,
            self.activation_relu_or_gelu == 2, self.norm_first, src_mask is not None, kpm, None, ps,
            attn.dropout if training else 0.0, batch_first,
        )  # fmt: skip
        return y if batched else y.squeeze(0)

    def _training_op_reason(self, src, src_mask, src_key_padding_mask, is_causal) -> str | None:
        """Why the fused training op does not run this call, or None."""
        forced = backends.forced()
        if src.device.type == "cpu" and forced != "triton":
            return encoder_ops.TRAIN_CPU_REASON
        if forced not in (None, "triton"):
            return f"backend {forced!r} forced (the fused layer is the triton backend's)"
        if src.device.type != "cuda" and forced != "triton":
            return f"no fused encoder layer for {src.device.type} tensors"
        if backends.torch_masks(src.device) and self.training and self.dropout.p > 0:
            return "torch's dropout stream (the fused layer draws Philox masks)"
        if backends.autocast_dtype(src.device.type) is not None:
            return "autocast"
        if self.activation_relu_or_gelu == 0:
            return "custom activation"
        attn = self.self_attn
        if not attn._qkv_same_embed_dim or attn.bias_k is not None or attn.add_zero_attn:
            return "attention with kdim/vdim, bias_k/bias_v or add_zero_attn"
        if attn.in_proj_weight.dtype != src.dtype:
            return "dtype differs from the weights"
        if (attn.in_proj_bias is None) != (self.linear1.bias is None) or (self.norm1.bias is None) != (
            self.linear1.bias is None
        ):
            return "biases neither all present nor all absent"
        if any(m.inplace for m in (self.dropout, self.dropout1, self.dropout2)):
            return "inplace dropout"
        if is_causal and src_mask is None:
            return "is_causal without src_mask"
        length = src.shape[-2] if src.dim() == 2 else src.shape[1] if attn.batch_first else src.shape[0]
        if src_mask is not None and not (
            src_mask.dim() == 2
            and tuple(src_mask.shape) == (length, length)
            and (is_causal or _is_causal_mask(src_mask, length, length))
        ):
            return "a src_mask other than the causal one"
        if src_key_padding_mask is not None and src_key_padding_mask.dtype != torch.bool:
            return "float src_key_padding_mask"
        return encoder_ops.train_unfused_reason(src)


def encoder_layer_weights(layer: torch.nn.TransformerEncoderLayer) -> list[Tensor | None]:
    """A layer's tensors in the order ``fastrec.ops.encoder.encoder_inference`` takes them (read from the
    modules' dictionaries: ``Module.__getattr__`` costs more than the second layer's arithmetic
    at batch 1)."""
    modules = layer._modules
    attn = modules["self_attn"]
    names = ("out_proj", "norm1", "linear1", "linear2", "norm2")
    params = [(attn._modules if name == "out_proj" else modules)[name]._parameters for name in names]
    weights = [attn._parameters["in_proj_weight"], attn._parameters["in_proj_bias"]]
    for p in params:
        weights += [p["weight"], p.get("bias")]
    return weights
