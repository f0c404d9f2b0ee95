"""Interaction data for the recommender models: loaders, the leave-one-out split, padding and batches.

``load("ml-100k")`` reads the MovieLens-100K copy inside the recbole wheel; paths are dispatched
to the MovieLens, RecBole ``.inter`` or CSV loaders. ``fastrec.data.cdnow`` holds the CDNOW
purchase-prediction data.
"""

from fastrec.data.batching import Batch, Batches, PositionBatches, pad
from fastrec.data.cdnow import CDNOW, load_cdnow
from fastrec.data.loaders import (
    DataError,
    Interactions,
    kcore,
    load,
    load_csv,
    load_movielens,
    load_recbole_inter,
)
from fastrec.data.split import Split, leave_one_out, train_examples, train_sequences, user_sequences
from fastrec.data.synthetic import synthetic, synthetic_catalogue

__all__ = [
    "CDNOW",
    "Batch",
    "Batches",
    "PositionBatches",
    "DataError",
    "Interactions",
    "Split",
    "kcore",
    "leave_one_out",
    "load",
    "load_cdnow",
    "load_csv",
    "load_movielens",
    "load_recbole_inter",
    "pad",
    "synthetic",
    "synthetic_catalogue",
    "train_examples",
    "train_sequences",
    "user_sequences",
]
