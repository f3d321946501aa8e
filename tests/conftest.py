"""Shared fixtures: offline Hub, tiny random models per family, small toy graphs."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# one TVM worker in tests: kernels here are tiny, and a spinning pool beside torch's (or
# beside other jobs on a 2-core runner) is slow; threading is measured in bench/, not here
os.environ.setdefault("TVM_NUM_THREADS", "1")
# compiles in tests use the default kernel schedule; tuning is tested on its own
os.environ.setdefault("ABQC_TUNE", "0")

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import abqc  # noqa: E402,F401  (registers the custom ops)

FAMILIES = ("llama", "qwen2", "mistral", "opt")


@pytest.fixture(scope="session")
def tiny_models():
    """family -> tiny random model (built once per session; tests must not edit weights)."""
    from frontends.tiny import tiny_model

    return {f: tiny_model(f, seed=0) for f in FAMILIES}


@pytest.fixture
def ids():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 256, (2, 24), generator=g)


class Toy(nn.Module):
    """x -> (fc1, fc2 share x) -> relu(fc1) * fc2 -> fc3: a small before-graph for pass tests."""

    def __init__(self, k=40, n=24):
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(k, n)
        self.fc2 = nn.Linear(k, n, bias=False)
        self.fc3 = nn.Linear(n, k)

    def forward(self, x):
        return self.fc3(torch.relu(self.fc1(x)) * self.fc2(x))


@pytest.fixture
def toy():
    """(eager Toy module, its exported GraphModule, an example input)."""
    from abqc.capture import PATH_KEY, linear_nodes, module_path

    model = Toy().eval()
    x = torch.randn(3, 5, 40)
    gm = torch.export.export(model, (x,), strict=False).module()
    for n in linear_nodes(gm):
        n.meta[PATH_KEY] = module_path(n)
    return model, gm, x
