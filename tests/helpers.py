"""Small helpers shared by the parity tests."""

import torch


def max_rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |a - b| / max |b|: the relative error of the whole tensor, robust to entries near 0."""
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float, what: str = "") -> None:
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = max_rel_err(actual, expected)
    assert err <= rtol, f"{what}: max relative error {err:.3e} > {rtol:.1e}"
