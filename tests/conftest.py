import os

import torch

# Without a GPU, Triton kernels run on CPU tensors in Triton's interpreter; it must be chosen before any
# kernel module is imported (meancache.ops imports them).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest


@pytest.fixture(autouse=True)
def _meancache_home(tmp_path_factory, monkeypatch):
    """Calibrations made on first use go to a fresh folder per test, never to ~/.cache/meancache."""
    monkeypatch.setenv("MEANCACHE_HOME", str(tmp_path_factory.mktemp("meancache_home")))


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture
def fresh_dynamo():
    """Dynamo's caches and counters (graph breaks included: ``reset`` keeps those) empty before and after."""
    _reset_dynamo()
    yield
    _reset_dynamo()


def _reset_dynamo():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
