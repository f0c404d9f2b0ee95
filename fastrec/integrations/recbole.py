"""RecBole 1.2.1 models on fastrec's kernels: ``apply(model)`` for a built model, ``enable()``
before RecBole builds one (``run_recbole``, ``get_model(name)(config, dataset)``).

What changes, all in place and with the parameters, ``state_dict`` keys and initialisation of
the RecBole model (only classes are swapped, as ``fastrec.patch`` does):

- ``recbole.model.layers.MultiHeadAttention`` (SASRec, BERT4Rec and every model built on
  ``TransformerEncoder``): the three projections as one matmul and the fused attention op
  (``fastrec.functional.attention``) with the attention-probability dropout inside the kernel.
  The model's ``get_attention_mask`` still builds RecBole's additive ``-10000`` mask, and tags it
  with its structure (key padding from ``item_seq != 0``, causal or bidirectional), so the kernel
  runs the causal / padding mask directly. A call where the two differ (a query row with no
  allowed key: RecBole's softmax is then uniform over every key, the kernel's row is zero), and
  any untagged mask, runs the additive mask through the kernel's general-mask path instead.
- ``recbole.model.layers.FeedForward``: its erf GELU / swish as ``F.gelu`` / ``F.silu``.
- ``Caser``: the horizontal convolution loop and the vertical convolution as one fused Caser
  block call (``fastrec.functional.caser``) on the model's own ``conv_h`` / ``conv_v``.
- ``BERT4Rec.calculate_loss`` (cross-entropy): the output head, the logits over every item and
  the loss on the real masked positions only, not on RecBole's padding slots as well.
- ``nn.GRU`` / ``nn.LSTM`` and the other modules ``fastrec.patch`` knows (GRU4Rec, NARM, ...).
- ``nn.Dropout``: ``fastrec.nn.Dropout`` (on the CPU torch's own masks, bit for bit, under the
  default dropout stream).

Left as they are, with the reason in the report: ``nn.Conv2d`` outside Caser (NextItNet's
dilated residual convolutions are plain convolutions followed by a LayerNorm, which oneDNN's
convolution runs as fast as the fused kernels) and the full-sort scoring (one matmul against
the item table, already torch's GEMM).
"""

from __future__ import annotations

import copy
import copyreg
import logging
import sys
from typing import Any

import torch
import torch.nn.functional as F
from recbole.model import layers as rb_layers
from recbole.model.abstract_recommender import SequentialRecommender
from recbole.model.sequential_recommender.bert4rec import BERT4Rec as _RecBoleBERT4Rec
from recbole.model.sequential_recommender.caser import Caser as _RecBoleCaser
from torch import Tensor

from fastrec import functional as FF
from fastrec import nn as fnn
from fastrec.patch import PatchReport, patch

__all__ = ["FeedForward", "MultiHeadAttention", "apply", "disable", "enable", "unapply"]

_MASK_ATTR = "_fastrec_structure"  # on the additive mask tensor: (key_padding_mask, causal)


class MultiHeadAttention(rb_layers.MultiHeadAttention):
    """RecBole's ``MultiHeadAttention`` on the fused attention op (same parameters)."""

    def forward(self, input_tensor: Tensor, attention_mask: Tensor) -> Tensor:
        batch, length, _ = input_tensor.shape
        heads, head_dim = self.num_attention_heads, self.attention_head_size
        weight = torch.cat([self.query.weight, self.key.weight, self.value.weight])
        bias = torch.cat([self.query.bias, self.key.bias, self.value.bias])
        qkv = F.linear(input_tensor, weight, bias).view(batch, length, 3, heads, head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        p = self.attn_dropout.p
        structure = getattr(attention_mask, _MASK_ATTR, None)
        if structure is not None:
            pad, causal = structure
            ctx = FF.attention(q, k, v, causal=causal, key_padding_mask=pad, dropout_p=p, training=self.training)
        else:
            ctx = FF.attention(q, k, v, attn_mask=attention_mask, dropout_p=p, training=self.training)
        ctx = ctx.transpose(1, 2).reshape(batch, length, self.all_head_size)
        hidden_states = self.out_dropout(self.dense(ctx))
        return self.LayerNorm(hidden_states + input_tensor)


class FeedForward(rb_layers.FeedForward):
    """RecBole's ``FeedForward`` with its GELU (erf) and swish as torch's one-kernel ops."""

    def forward(self, input_tensor: Tensor) -> Tensor:
        act = self.intermediate_act_fn
        func = getattr(act, "__func__", None)
        hidden_states = self.dense_1(input_tensor)
        if func is rb_layers.FeedForward.gelu:
            hidden_states = F.gelu(hidden_states)
        elif func is rb_layers.FeedForward.swish:
            hidden_states = F.silu(hidden_states)
        else:
            hidden_states = act(hidden_states)
        hidden_states = self.dropout(self.dense_2(hidden_states))
        return self.LayerNorm(hidden_states + input_tensor)


def _tagged_attention_mask(self, item_seq: Tensor, bidirectional: bool = False) -> Tensor:
    """RecBole's additive mask, tagged with its structure where the fused masks give the same
    attention (every query row keeps at least one key)."""
    mask = SequentialRecommender.get_attention_mask(self, item_seq, bidirectional)
    keep = item_seq != 0
    full_rows = keep.any(-1).all() if bidirectional else keep[:, 0].all()
    if bool(full_rows):
        setattr(mask, _MASK_ATTR, (~keep, not bidirectional))
    return mask


def _caser_forward(self, user: Tensor, item_seq: Tensor) -> Tensor:
    """RecBole's ``Caser.forward`` with the convolution block as one fused call."""
    if not (self.n_h and self.n_v):
        return _RecBoleCaser.forward(self, user, item_seq)
    item_seq_emb = self.item_embedding(item_seq)
    user_emb = self.user_embedding(user).squeeze(1)
    convs = list(self.conv_h)
    out_h, out_v = FF.caser(
        item_seq_emb,
        [c.weight for c in convs],
        None if convs[0].bias is None else [c.bias for c in convs],
        self.conv_v.weight,
        self.conv_v.bias,
        "relu",
        "none",
    )
    out = self.dropout(torch.cat([out_v, out_h], 1))
    z = self.ac_fc(self.fc1(out))
    return self.ac_fc(self.fc2(torch.cat([z, user_emb], 1)))


def _bert4rec_calculate_loss(self, interaction: Any) -> Tensor:
    """RecBole's ``BERT4Rec.calculate_loss`` (CE) on the real masked positions only.

    RecBole gathers ``mask_len`` slots per sequence (left-padded with index 0), runs the output
    head and the logits over every item on all of them, and zeroes the padding slots' losses
    afterwards. The same loss comes from picking the real slots' encoder rows first (one gather
    of ``masked_index > 0``, RecBole's own test for a real slot), then the output head, logits and
    the mean cross-entropy on those rows only; the encoder runs as in ``forward`` (same dropout
    draws)."""
    if self.loss_type != "CE":
        return _RecBoleBERT4Rec.calculate_loss(self, interaction)
    item_seq = interaction[self.MASK_ITEM_SEQ]
    masked_index = interaction[self.MASK_INDEX]
    batch, length = item_seq.shape
    position_ids = torch.arange(length, device=item_seq.device).unsqueeze(0).expand_as(item_seq)
    input_emb = self.item_embedding(item_seq) + self.position_embedding(position_ids)
    input_emb = self.dropout(self.LayerNorm(input_emb))
    mask = self.get_attention_mask(item_seq, bidirectional=True)
    hidden = self.trm_encoder(input_emb, mask, output_all_encoded_layers=True)[-1]
    real = masked_index > 0
    offsets = torch.arange(batch, device=item_seq.device).unsqueeze(1) * length
    rows = (masked_index + offsets)[real]
    picked = hidden.reshape(batch * length, -1).index_select(0, rows)
    picked = self.output_ln(self.output_gelu(self.output_ffn(picked)))
    logits = F.linear(picked, self.item_embedding.weight[: self.n_items], self.output_bias)
    return F.cross_entropy(logits, interaction[self.POS_ITEMS][real])


_PATCHED: dict[type, type] = {}  # RecBole model class -> its fastrec subclass


def _patched_class(cls: type) -> type | None:
    """The fastrec subclass of a RecBole model class (None when nothing at model level applies):
    the tagging ``get_attention_mask`` where the model uses RecBole's own, Caser's fused forward,
    BERT4Rec's loss on the real masked positions."""
    if cls in _PATCHED:
        return _PATCHED[cls]
    members: dict[str, Any] = {}
    if issubclass(cls, SequentialRecommender) and cls.get_attention_mask is SequentialRecommender.get_attention_mask:
        members["get_attention_mask"] = _tagged_attention_mask
    if issubclass(cls, _RecBoleCaser) and cls.forward is _RecBoleCaser.forward:
        members["forward"] = _caser_forward
    if (
        issubclass(cls, _RecBoleBERT4Rec)
        and cls.calculate_loss is _RecBoleBERT4Rec.calculate_loss
        and cls.forward is _RecBoleBERT4Rec.forward
    ):
        members["calculate_loss"] = _bert4rec_calculate_loss
    if not members:
        return None
    name = f"Fastrec{cls.__name__}"
    members.update({"__module__": __name__, "__qualname__": name, "_fastrec_base": cls})
    patched = type(name, (cls,), members)
    setattr(sys.modules[__name__], name, patched)  # picklable by name
    _PATCHED[cls] = patched
    return patched


_MEMBER_TEXT = {
    "get_attention_mask": "tagged attention mask",
    "forward": "fused Caser block",
    "calculate_loss": "loss on the real masked positions",
}

_LAYERS = {
    rb_layers.MultiHeadAttention: MultiHeadAttention,
    rb_layers.FeedForward: FeedForward,
    torch.nn.Dropout: fnn.Dropout,
}
_SUBLAYER_ONLY = (rb_layers.TransformerLayer, rb_layers.TransformerEncoder)


def apply(model: torch.nn.Module) -> PatchReport:
    """Put a built RecBole model on fastrec's kernels, in place (see the module docstring);
    returns what was swapped and what was left, and why. ``unapply`` undoes it."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module (a RecBole model), got {type(model).__name__}")
    report = PatchReport()
    base = getattr(type(model), "_fastrec_base", type(model))
    patched = _patched_class(base)
    if patched is not None and type(model) is not patched:
        model.__class__ = patched
        members = [m for m in _MEMBER_TEXT if m in vars(patched)]
        if getattr(model, "loss_type", "CE") != "CE":  # BERT4Rec's BPR loss stays RecBole's
            members = [m for m in members if m != "calculate_loss"]
        what = ", ".join(_MEMBER_TEXT[m] for m in members)
        report.replaced.append(("<root>", base.__name__, f"{__name__}.{patched.__name__} ({what})"))
    for name, module in model.named_modules():
        cls = type(module)
        if cls in _LAYERS:
            module.__class__ = _LAYERS[cls]
            report.replaced.append((name, f"{cls.__module__}.{cls.__name__}", _qualified(_LAYERS[cls])))
        elif isinstance(module, _SUBLAYER_ONLY):
            report.left.append((name, cls.__name__, "runs its replaced sublayers"))
        elif isinstance(module, torch.nn.Conv2d) and not isinstance(model, _RecBoleCaser):
            why = "plain convolution (no fused act/pool follows): oneDNN's is as fast"
            report.left.append((name, cls.__name__, why))
    inner = patch(model, conv=False)
    report.replaced += inner.replaced
    report.left += [row for row in inner.left if "conv=False" not in row[2]]
    if hasattr(model, "full_sort_predict"):
        report.left.append(("full_sort_predict", base.__name__, "one matmul against the item table: torch's GEMM"))
    if torch.is_anomaly_enabled():
        why = (
            "on (RecBole 1.2.1's sine.py turns it on when its sequential models are imported): a NaN "
            "check on every backward output, patched or not; torch.autograd.set_detect_anomaly(False) drops it"
        )
        report.left.append(("torch.autograd", "anomaly detection", why))
    return report


def unapply(model: torch.nn.Module) -> None:
    """Restore the RecBole (and torch) classes ``apply`` swapped."""
    from fastrec.patch import unpatch

    base = getattr(type(model), "_fastrec_base", None)
    if base is not None:
        model.__class__ = base
    back = {twin: cls for cls, twin in _LAYERS.items()}
    for module in model.modules():
        cls = back.get(type(module))
        if cls is not None:
            module.__class__ = cls
    unpatch(model)


_log = logging.getLogger(__name__)
_ORIGINAL_GET_MODEL: Any = None


class _EnabledModelType(type):
    """The type of the classes ``enable()``'s ``get_model`` returns. RecBole keeps the class in
    its config, which its checkpoints pickle: it pickles as the RecBole class it wraps, so a
    checkpoint loads without fastrec."""


copyreg.pickle(_EnabledModelType, lambda cls: (copy.copy, (cls._fastrec_wraps,)))
_ENABLED: dict[type, type] = {}  # RecBole model class -> its self-applying subclass


def _get_model(model_name: str) -> type:
    """RecBole's ``get_model``, returning a class whose instances ``apply`` themselves."""
    cls = _ORIGINAL_GET_MODEL(model_name)
    if not (isinstance(cls, type) and issubclass(cls, torch.nn.Module) and type(cls) is type):
        return cls
    if cls not in _ENABLED:

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            cls.__init__(self, *args, **kwargs)
            self.__class__ = cls
            _log.info("fastrec.integrations.recbole.apply(%s):\n%s", cls.__name__, apply(self))

        members = {"__init__": __init__, "__module__": cls.__module__, "_fastrec_wraps": cls}
        _ENABLED[cls] = _EnabledModelType(cls.__name__, (cls,), members)
    return _ENABLED[cls]


def enable() -> None:
    """Make RecBole's ``get_model`` (and so ``run_recbole``, ``load_data_and_model`` and
    scripts that call it) build models that ``apply`` fastrec as they are created; the report is
    logged through RecBole's logger. ``disable()`` undoes it."""
    global _ORIGINAL_GET_MODEL
    import recbole.utils
    import recbole.utils.utils

    if _ORIGINAL_GET_MODEL is None:
        _ORIGINAL_GET_MODEL = recbole.utils.utils.get_model
    _replace_get_model(_ORIGINAL_GET_MODEL, _get_model)


def disable() -> None:
    """Undo ``enable``: RecBole builds its own models again (built ones stay as they are)."""
    if _ORIGINAL_GET_MODEL is not None:
        _replace_get_model(_get_model, _ORIGINAL_GET_MODEL)


def _replace_get_model(old: Any, new: Any) -> None:
    for name, module in list(sys.modules.items()):
        if (name == "recbole" or name.startswith("recbole.")) and getattr(module, "get_model", None) is old:
            module.get_model = new


def _qualified(cls: type) -> str:
    return f"{cls.__module__}.{cls.__name__}"
