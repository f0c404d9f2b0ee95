"""Drop-in replacements for ``torch.nn`` modules (subclasses; same parameters and state_dict)."""

from fastrec.nn.attention import MultiheadAttention, TransformerEncoderLayer

__all__ = ["MultiheadAttention", "TransformerEncoderLayer"]
