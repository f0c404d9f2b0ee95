"""Test set-up: Triton's interpreter on machines without CUDA, per-test seeds, shared helpers.

``TRITON_INTERPRET=1`` must be set before ``triton`` is first imported, so it is set here,
before any test module imports fastrec.
"""

import os
import zlib

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
# fp32 is compared with float64 references at fp32 bounds: no TF32 in cuDNN's convolutions
# (on by default, unlike matmuls), which fastrec's conv follows as torch's Conv2d does.
torch.backends.cudnn.allow_tf32 = False


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if item.get_closest_marker("cuda") is not None and not CUDA:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed(request):
    """Each test draws fresh inputs, seeded from its own name for reproducibility."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
    yield
