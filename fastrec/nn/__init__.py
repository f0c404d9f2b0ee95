"""Drop-in replacements for ``torch.nn`` modules (subclasses; same parameters and state_dict)."""

from fastrec.nn.attention import MultiheadAttention, TransformerEncoderLayer
from fastrec.nn.conv import CaserConv
from fastrec.nn.rnn import GRU, LSTM, RNN

__all__ = ["CaserConv", "GRU", "LSTM", "RNN", "MultiheadAttention", "TransformerEncoderLayer"]
