"""Drop-in replacements for ``torch.nn`` modules (subclasses; same parameters and state_dict)."""

from fastrec.nn.attention import MultiheadAttention
from fastrec.nn.caser import CaserConv
from fastrec.nn.conv import Conv1d, Conv2d, ConvBlock
from fastrec.nn.dropout import Dropout
from fastrec.nn.encoder import TransformerEncoderLayer
from fastrec.nn.linear_cross_entropy import LinearCrossEntropyLoss
from fastrec.nn.rnn import GRU, LSTM, RNN, GRUCell, LSTMCell, RNNCell

__all__ = [
    "CaserConv",
    "Conv1d",
    "Conv2d",
    "ConvBlock",
    "Dropout",
    "GRU",
    "GRUCell",
    "LSTM",
    "LSTMCell",
    "LinearCrossEntropyLoss",
    "MultiheadAttention",
    "RNN",
    "RNNCell",
    "TransformerEncoderLayer",
]
