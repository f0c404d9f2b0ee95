"""Drop-in replacements for ``torch.nn`` modules (subclasses; same parameters and state_dict)."""

from fastrec.nn.attention import MultiheadAttention, TransformerEncoderLayer
from fastrec.nn.rnn import GRU, LSTM, RNN, GRUCell, LSTMCell, RNNCell

__all__ = ["GRU", "LSTM", "RNN", "GRUCell", "LSTMCell", "MultiheadAttention", "RNNCell", "TransformerEncoderLayer"]
