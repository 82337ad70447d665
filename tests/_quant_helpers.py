"""What the quantized-layer tests (test_quant_mamba.py, test_quant_io.py) share: a seeded
``nn.Linear`` and activations with a few massive channels, as LLM / Mamba activations have."""

import math

import torch
from torch import nn


def seeded_linear(k=96, n=64, bias=True, seed=0) -> nn.Linear:
    """``nn.Linear(k, n)`` with N(0, 1/k) weights and N(0, 1) bias from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=g) / math.sqrt(k))
        if bias:
            lin.bias.copy_(torch.randn(n, generator=g))
    return lin


def outlier_x(m=256, k=96, seed=1, gain=60.0) -> torch.Tensor:
    """``[m, k]`` N(0, 1) activations whose channels 3, 40 and 77 are scaled by ``gain``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    x[:, [3, 40, 77]] *= gain
    return x
