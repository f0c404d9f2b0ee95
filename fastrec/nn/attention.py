"""Drop-in attention modules: subclasses of the torch modules they replace.

Only ``forward`` is overridden, so constructor, defaults, initialisation, parameters and
``state_dict`` are torch's by construction. A call whose options the fused path does not
cover runs torch's own forward and is counted in ``fastrec.stats()``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fastrec import backends
from fastrec import functional as FF

_MODULE = "MultiheadAttention"


class MultiheadAttention(torch.nn.MultiheadAttention):
    """``torch.nn.MultiheadAttention`` whose attention core is fastrec's fused kernel.

    Fused: self- and cross-attention with ``kdim == vdim == embed_dim``, batched or not,
    ``batch_first`` either way, bool or float ``attn_mask`` (2-D or 3-D) and
    ``key_padding_mask``, ``is_causal``, dropout, ``add_bias_kv``, ``add_zero_attn``.
    ``need_weights=True`` (torch's default) is fused on the CPU: the C++ kernel also writes the
    probabilities it forms (averaged over heads or not, as torch); on CUDA the Triton kernels
    form none, so such calls run torch's forward there: pass ``need_weights=False`` for speed.
    A query row with no allowed key gets zero attention (the output is out_proj's bias) and zero
    weights; torch's weights path gives NaN for both there. A 2-D ``attn_mask`` equal to the
    causal mask is recognised and run as ``causal``.
    """

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        reason = self._unfused_reason(query, key, value, key_padding_mask, need_weights, attn_mask)
        if reason is not None:
            backends.count(_MODULE, "torch", reason)
            return super().forward(
                query,
                key,
                value,
                key_padding_mask=key_padding_mask,
                need_weights=need_weights,
                attn_mask=attn_mask,
                average_attn_weights=average_attn_weights,
                is_causal=is_causal,
            )
        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint (as torch.nn.MultiheadAttention)")
        out, weights = self._fused_forward(query, key, value, key_padding_mask, attn_mask, is_causal, need_weights)
        if weights is not None and average_attn_weights:
            weights = weights.mean(dim=1)
        if weights is not None and query.dim() == 2:
            weights = weights.squeeze(0)
        return out, weights

    def _unfused_reason(self, query, key, value, key_padding_mask, need_weights, attn_mask) -> str | None:
        """Why this call runs torch's forward (``None`` if fused). Bad shapes also go to torch,
        which raises its own errors."""
        if need_weights and (query.device.type != "cpu" or backends.forced() == "triton"):
            return "need_weights=True off the CPU (the triton kernels form no weights)"
        if not self._qkv_same_embed_dim:
            return "kdim/vdim differ from embed_dim"
        tensors = (query, key, value, key_padding_mask, attn_mask)
        if any(isinstance(t, Tensor) and t.is_nested for t in tensors):
            return "nested tensor input"
        if query.dim() not in (2, 3) or key.dim() != query.dim() or value.dim() != query.dim():
            return "input rank"
        if query.shape[-1] != self.embed_dim or key.shape[-1] != self.embed_dim:
            return "input embedding size"
        if key.shape[:-1] != value.shape[:-1]:
            return "key/value shapes differ"
        if query.dtype != self.in_proj_weight.dtype or key.dtype != query.dtype or value.dtype != query.dtype:
            if backends.autocast_dtype(query.device.type) is None:
                return "dtype differs from the weights"
        if query.dim() == 3:
            batch_dim = 0 if self.batch_first else 1
            if key.shape[batch_dim] != query.shape[batch_dim]:
                return "batch sizes differ"
        for mask in (key_padding_mask, attn_mask):
            if mask is not None and mask.dtype != torch.bool and not mask.is_floating_point():
                return "mask dtype"
        return None

    def _fused_forward(
        self, query, key, value, key_padding_mask, attn_mask, is_causal, need_weights
    ) -> tuple[Tensor, Tensor | None]:
        """(output, per-head weights (B, H, Lq, Lk) or None)."""
        batched = query.dim() == 3
        if not batched:  # (L, E) -> (1, L, E)
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        # Tokens stay in the caller's layout, (B, L, E) or (L, B, E): the projections read the
        # input in place and the heads are strided views.
        batch_major = self.batch_first or not batched
        batch, len_q = query.shape[:2] if batch_major else query.shape[1::-1]
        embed, heads, head_dim = self.embed_dim, self.num_heads, self.head_dim

        len_k = key.shape[1] if batch_major else key.shape[0]
        check_masks(attn_mask, key_padding_mask, batch, heads, len_q, len_k)

        def split_heads(x: Tensor) -> Tensor:  # tokens -> (B, H, L, D), a view (L explicit: B may be 0)
            if batch_major:
                return x.view(batch, x.shape[1], heads, head_dim).transpose(1, 2)
            return x.view(x.shape[0], batch, heads, head_dim).permute(1, 2, 0, 3)

        q, k, v = (split_heads(x) for x in self._project(query, key, value))

        causal = False
        if attn_mask is not None:
            if is_causal or _is_causal_mask(attn_mask, len_q, k.shape[2]):
                attn_mask, causal = None, True
            elif attn_mask.dim() == 3:
                attn_mask = attn_mask.view(batch, heads, len_q, len_k)

        extra_keys = []  # torch's order: bias_k/bias_v first, then the zero key
        if self.bias_k is not None:
            extra_keys.append((self.bias_k, self.bias_v))
        if self.add_zero_attn:
            zeros = q.new_zeros(1, 1, embed)
            extra_keys.append((zeros, zeros))
        for k_extra, v_extra in extra_keys:
            k = torch.cat([k, k_extra.view(1, heads, 1, head_dim).expand(batch, -1, -1, -1)], dim=2)
            v = torch.cat([v, v_extra.view(1, heads, 1, head_dim).expand(batch, -1, -1, -1)], dim=2)
            if causal:  # the extra key is visible to every query: the causal mask becomes general
                attn_mask, causal = _causal_bool_mask(len_q, k.shape[2] - 1, q.device), False
            if attn_mask is not None:
                attn_mask = F.pad(attn_mask, (0, 1))
            if key_padding_mask is not None:
                key_padding_mask = F.pad(key_padding_mask, (0, 1))

        out = FF.attention(
            q,
            k,
            v,
            causal=causal,
            key_padding_mask=key_padding_mask,
            attn_mask=attn_mask,
            dropout_p=self.dropout if self.training else 0.0,
            need_weights=need_weights,
        )
        out, weights = out if need_weights else (out, None)
        # Batch-major output is contiguous (B, L, E), except under torch's dropout stream, where it
        # takes torch's layout ((L, B, E) in memory): torch's next dropout draws in memory order.
        # (In eval mode nothing draws, and the contiguous layout is the faster one.)
        time_major = not batch_major or (self.training and backends.torch_masks(query.device))
        out = out.permute(2, 0, 1, 3) if time_major else out.transpose(1, 2)
        out = F.linear(out.reshape(-1, embed), self.out_proj.weight, self.out_proj.bias)
        out = out.view(len_q, batch, embed) if time_major else out.view(batch, len_q, embed)
        if time_major and batch_major:
            out = out.transpose(0, 1)
        return (out if batched else out.squeeze(0)), weights

    def _project(self, query: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The input projections; one GEMM for self-attention (query is key is value)."""
        weight, bias = self.in_proj_weight, self.in_proj_bias
        embed = self.embed_dim
        if query is key and key is value:
            return F.linear(query, weight, bias).chunk(3, dim=-1)
        w_q, w_k, w_v = weight.chunk(3)
        b_q, b_k, b_v = bias.chunk(3) if bias is not None else (None, None, None)
        q = F.linear(query, w_q, b_q)
        if key is value:
            k, v = F.linear(key, weight[embed:], None if bias is None else bias[embed:]).chunk(2, dim=-1)
            return q, k, v
        return q, F.linear(key, w_k, b_k), F.linear(value, w_v, b_v)


def check_masks(
    attn_mask: Tensor | None, key_padding_mask: Tensor | None, batch: int, heads: int, len_q: int, len_k: int
) -> None:
    """torch's mask shapes for ``MultiheadAttention`` (batch 1 for unbatched input): ``attn_mask``
    ``(L, S)`` or ``(batch*heads, L, S)``, ``key_padding_mask`` ``(batch, S)``. Every backend runs
    behind this check, so no mask of another shape is reshaped into one that fits."""
    if attn_mask is not None:
        if attn_mask.dim() == 2:
            form, expected = "(L, S)", (len_q, len_k)
        elif attn_mask.dim() == 3:
            form, expected = "(batch*heads, L, S)", (batch * heads, len_q, len_k)
        else:
            shape = tuple(attn_mask.shape)
            raise ValueError(f"attn_mask must be 2-D (L, S) or 3-D (batch*heads, L, S), got shape {shape}")
        if tuple(attn_mask.shape) != expected:
            raise RuntimeError(f"attn_mask must be {form} = {expected}, got {tuple(attn_mask.shape)}")
    if key_padding_mask is not None and tuple(key_padding_mask.shape) != (batch, len_k):
        raise ValueError(f"key_padding_mask must be (batch, S) = {(batch, len_k)}, got {tuple(key_padding_mask.shape)}")


def _causal_bool_mask(len_q: int, len_k: int, device: torch.device) -> Tensor:
    return torch.ones(len_q, len_k, dtype=torch.bool, device=device).triu(1)


def _is_causal_mask(mask: Tensor, len_q: int, len_k: int) -> bool:
    """Whether a 2-D attn_mask is exactly the causal mask (bool True above the diagonal, or
    float -inf above and 0 on and below it). The answer is cached on the tensor itself, per
    in-place version, so a mask reused across calls and layers is checked once."""
    if mask.dim() != 2 or len_q != len_k or tuple(mask.shape) != (len_q, len_k):
        return False
    if torch.compiler.is_compiling() or mask.requires_grad:
        return False
    cached = getattr(mask, "_fastrec_is_causal", None)
    if cached is not None and cached[0] == mask._version:
        return cached[1]
    upper = _causal_bool_mask(len_q, len_k, mask.device)
    if mask.dtype == torch.bool:
        result = torch.equal(mask, upper)
    else:
        result = bool((torch.isneginf(mask) == upper).all() and (mask[~upper] == 0).all())
    mask._fastrec_is_causal = (mask._version, result)
    return result
