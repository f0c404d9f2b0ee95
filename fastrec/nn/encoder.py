"""Drop-in transformer encoder layer: a subclass of ``torch.nn.TransformerEncoderLayer``.

Only ``forward`` is overridden, so constructor, defaults, initialisation, parameters and
``state_dict`` are torch's by construction. Its attention is ``fastrec.nn.MultiheadAttention``
and its dropouts ``fastrec.nn.Dropout``; at inference on the CPU the whole layer is the encoder
op (``fastrec.ops.encoder``).
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
    (``fastrec.ops.encoder``: one C++ call), for serving at small batches."""

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
