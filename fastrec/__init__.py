"""fastrec: fused Triton and C++ kernels for sequential recommender models.

Public API: ``patch``/``unpatch`` (swap torch modules for fused twins), ``use_backend``
(force ``triton``/``cpp``/``torch``), ``use_dropout_stream`` (where dropout masks come from:
``auto``, ``torch`` or fastrec's Philox), ``stats`` (which backend ran what), ``nn`` (drop-in
modules) and ``functional`` (the ops).
"""

from fastrec import backends, functional, nn
from fastrec.backends import stats, use_backend, use_dropout_stream
from fastrec.patch import PatchReport, patch, unpatch

__version__ = "0.1.0"
__all__ = [
    "PatchReport",
    "backends",
    "functional",
    "nn",
    "patch",
    "stats",
    "unpatch",
    "use_backend",
    "use_dropout_stream",
]
