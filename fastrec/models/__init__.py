"""Sequential recommenders built from fastrec modules (``backend="fastrec"``) or from plain
torch modules (``backend="torch"``), so that one script compares the two.

Each model: ``forward(batch) -> (B, dim)``, ``scores(batch) -> (B, n_items + 1)`` (column 0,
padding, is -inf), ``loss(batch, kind="ce"|"sampled-softmax"|"gbce"|"bce", n_negatives=1)``
(``batch.target`` (B,), or (B, L) for all-positions training where the model has
``hidden_states``) and the serving call
``recommend(histories, k, exclude_seen=True, users=None) -> (item ids (B, k), scores (B, k))``.
"""

from fastrec.models.base import ModelInput, SequentialRecommender
from fastrec.models.behavior import BehaviorAttention, BehaviorCNN, BehaviorRNN
from fastrec.models.caser import Caser
from fastrec.models.gru4rec import GRU4Rec
from fastrec.models.sasrec import SASRec

MODELS = {"sasrec": SASRec, "gru4rec": GRU4Rec, "caser": Caser}

__all__ = [
    "MODELS",
    "BehaviorAttention",
    "BehaviorCNN",
    "BehaviorRNN",
    "Caser",
    "GRU4Rec",
    "ModelInput",
    "SASRec",
    "SequentialRecommender",
]
