"""Drop-in replacements for ``torch.nn`` modules (subclasses; same parameters and state_dict)."""

from fastrec.nn.attention import MultiheadAttention, TransformerEncoderLayer
from fastrec.nn.rnn import GRU, LSTM, RNN

__all__ = ["GRU", "LSTM", "RNN", "MultiheadAttention", "TransformerEncoderLayer"]
