"""Comparison at the precision the project promises: results within a relative error of the
reference, measured against the reference's magnitude rather than elementwise (an entry that is
a sum of cancelling terms can land near zero, where any rounding is a large elementwise error).

A parameter's gradient is measured against the largest gradient of its module: PSA's SE biases
get gradients that cancel across the softmax's branches to a few thousandths of the others, and
are exact only to the rounding of the terms they are summed from.
"""
from typing import Dict, Optional

import torch


def assert_relative_close(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-5,
                          scale: Optional[float] = None, msg: str = '') -> None:
    assert actual.shape == expected.shape, f'{msg}: shape {tuple(actual.shape)} != {tuple(expected.shape)}'
    actual, expected = actual.detach(), expected.detach()
    scale = max(float(expected.abs().max()), scale or 0.0, 1e-30)
    error = float((actual - expected).abs().max()) / scale
    assert error <= rel, f'{msg}: max error {error:.2e} of the reference magnitude exceeds {rel:.0e}'


def assert_grads_close(actual: Dict[str, torch.Tensor], expected: Dict[str, torch.Tensor], rel: float = 1e-5) -> None:
    """Every gradient within ``rel`` of the largest reference gradient."""
    assert actual.keys() == expected.keys()
    scale = max(float(g.detach().abs().max()) for g in expected.values())
    for name, grad in expected.items():
        assert_relative_close(actual[name], grad, rel=rel, scale=scale, msg=name)
