"""Fused bias add and GELU: ``y = GELU(x + bias)``, GPT-2's tanh form by default."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import backend

APPROXIMATIONS = ("tanh", "none")


def bias_gelu_reference(x: torch.Tensor, bias: torch.Tensor | None,
                        approximate: str = "tanh") -> torch.Tensor:
    """Plain-math GELU(x + bias), for tests (call it on float64 inputs)."""
    if bias is not None:
        x = x + bias
    if approximate == "tanh":
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def _check_inputs(x: torch.Tensor, bias: torch.Tensor | None, approximate: str) -> None:
    if approximate not in APPROXIMATIONS:
        raise ValueError(f"bias_gelu: approximate must be one of {APPROXIMATIONS}, got {approximate!r}")
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        raise ValueError("bias_gelu: x must be a tensor with at least one dimension")
    if bias is not None and tuple(bias.shape) != (x.shape[-1],):
        raise ValueError(f"bias_gelu: bias has shape {tuple(bias.shape)}, expected ({x.shape[-1]},) "
                         f"to match the last dimension of x {tuple(x.shape)}")


def _kernel_problem(x: torch.Tensor, bias: torch.Tensor | None, approximate: str = "tanh") -> str | None:
    return "no Triton bias+GELU kernel is built yet"


backend.register("bias_gelu", _kernel_problem)


def bias_gelu(x: torch.Tensor, bias: torch.Tensor | None, approximate: str = "tanh") -> torch.Tensor:
    """GELU(x + bias) over the last dimension of ``x``, through the backend switch.

    ``approximate="tanh"`` is GPT-2's form; ``"none"`` is the exact erf form.
    """
    _check_inputs(x, bias, approximate)
    backend.route("bias_gelu", x, bias, approximate)  # the Triton kernel arrives in its own issue
    if bias is not None:
        x = x + bias
    return F.gelu(x, approximate=approximate)
