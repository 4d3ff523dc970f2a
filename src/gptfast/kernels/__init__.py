"""Triton kernels for GPT training, each with an eager PyTorch path behind one backend switch.

Public operations: :func:`layer_norm`, :func:`add_layer_norm`, :func:`bias_gelu`, :func:`flash_attention`,
:func:`cross_entropy`, :func:`linear_cross_entropy`, :func:`linear_bias_gelu` (its module also holds
``mlp_gelu``, GPT-2's MLP around it, whose backward runs ``matmul_gelu_grad``). The package is
``gptfast.kernels``. What the tools (the lab, the benchmarks, the tests) know of each op is its spec:
``registry.SPECS``.
"""

from .backend import BACKENDS, BackendError, Route, explain, get_backend, set_backend, use_backend
from .bias_gelu import bias_gelu
from .cross_entropy import cross_entropy
from .flash_attention import flash_attention
from .layer_norm import add_layer_norm, layer_norm
from .linear_bias_gelu import linear_bias_gelu
from .linear_cross_entropy import linear_cross_entropy

__all__ = [
    "BACKENDS", "BackendError", "Route", "explain", "get_backend", "set_backend", "use_backend",
    "add_layer_norm", "bias_gelu", "cross_entropy", "flash_attention", "layer_norm", "linear_bias_gelu",
    "linear_cross_entropy",
]
