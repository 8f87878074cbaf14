import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
if not torch.cuda.is_available():
    # Triton picks interpreter or compiler when it decorates a kernel, i.e. at the kernels' first import,
    # which any test module may trigger (test_hf through the model): set it before any of them is collected.
    os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
