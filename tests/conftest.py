"""Test set-up: without CUDA, Triton kernels run on CPU tensors through the interpreter."""
import os

# Tests never touch the network: model hubs are offline (weights are built in code or absent).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

# The offline models (`tiny`, `tiny-qwen`, `tiny-editor`), the MiniBench dataset and reward register
# themselves in the core's registries when imported, as the rcgrpo command line does.
import rcgrpo.minibench  # noqa: E402,F401
import rcgrpo.testing  # noqa: E402,F401

from rcgrpo_kernels._backends import backend_unavailable_reason  # noqa: E402


def _device():
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


@pytest.fixture
def device():
    return _device()


def requires_backend(name: str):
    """Skip marker naming why a backend cannot run here."""
    reason = backend_unavailable_reason(name, _device() if name == "triton" else torch.device("cpu"))
    return pytest.mark.skipif(reason is not None, reason=f"{name} backend unavailable: {reason}")


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
