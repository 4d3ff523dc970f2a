"""Drop-in kernels for models you already have: ``gptfast.patch(model)``.

Swaps in place, keeping every parameter (same tensors, same state-dict names):

* ``nn.LayerNorm`` over the last dimension becomes :class:`FusedLayerNorm` (``kernels.layer_norm``).
* A linear layer followed by GELU (``nn.Linear`` then ``nn.GELU`` inside an ``nn.Sequential``, or
  the ``c_fc`` / ``act`` pair of transformers' ``GPT2MLP``) becomes :class:`LinearBiasGELU`, a
  matmul without bias followed by ``kernels.bias_gelu``; the GELU module becomes ``nn.Identity``.
* transformers' GPT-2 runs attention through ``kernels.flash_attention``, registered as the
  attention implementation ``"gptfast"``. Batches with padding (an ``attention_mask`` with zeros)
  take transformers' own SDPA path: the flash kernel takes left padding (``key_start``), not a
  general mask.
* A transformers causal language model (``GPT2LMHeadModel``, ``...ForCausalLM``) computes its loss
  with ``kernels.cross_entropy``, on the logits in their own dtype, rather than on a float32 copy.

Each op goes through the backend switch, so a patched model still runs anywhere. Forward hooks on
replaced modules are not carried over.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import kernels

ATTENTION_NAME = "gptfast"
# transformers' activation classes that compute GELU, and which form (kernels.bias_gelu's names).
_TRANSFORMERS_GELU = {"GELUActivation": "none", "NewGELUActivation": "tanh", "GELUTanh": "tanh",
                      "PytorchGELUTanh": "tanh", "FastGELUActivation": "tanh"}


def _from_transformers(module: nn.Module) -> bool:
    return type(module).__module__.startswith("transformers.")


class FusedLayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` over the last dimension, computed by ``kernels.layer_norm``."""

    @classmethod
    def replacing(cls, layer_norm: nn.LayerNorm) -> FusedLayerNorm:
        """A FusedLayerNorm holding ``layer_norm``'s own weight and bias tensors."""
        fused = cls(layer_norm.normalized_shape, layer_norm.eps, layer_norm.elementwise_affine,
                    bias=layer_norm.bias is not None, device="meta")
        fused.weight, fused.bias = layer_norm.weight, layer_norm.bias
        return fused.train(layer_norm.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.layer_norm(x, self.weight, self.bias, self.eps)


class LinearBiasGELU(nn.Module):
    """GELU(x W^T + b): the matmul without its bias, then ``kernels.bias_gelu`` adds b and applies GELU.

    Keeps the replaced layer's ``weight`` and ``bias`` under those names. ``transposed``: the weight
    is stored (in_features, out_features), as in GPT-2's ``Conv1D``.
    """

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None, approximate: str, transposed: bool):
        super().__init__()
        self.weight, self.bias = weight, bias
        self.approximate, self.transposed = approximate, transposed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.t() if self.transposed else self.weight
        return kernels.bias_gelu(F.linear(x, weight), self.bias, self.approximate)

    def extra_repr(self) -> str:
        return f"approximate={self.approximate!r}, transposed={self.transposed}"


def _gelu_form(module: nn.Module) -> str | None:
    """The GELU form ("tanh" or "none") ``module`` computes, or None if it is no GELU."""
    if isinstance(module, nn.GELU):
        return module.approximate
    if _from_transformers(module):
        return _TRANSFORMERS_GELU.get(type(module).__name__)
    return None


def _fuse_linear_gelu(linear: nn.Module, gelu: nn.Module) -> LinearBiasGELU | None:
    """The fused replacement for ``linear`` followed by ``gelu``, or None if they are not that pair."""
    approximate = _gelu_form(gelu)
    if approximate is None:
        return None
    if type(linear) is nn.Linear:
        return LinearBiasGELU(linear.weight, linear.bias, approximate, transposed=False)
    if _from_transformers(linear) and type(linear).__name__ == "Conv1D":
        return LinearBiasGELU(linear.weight, linear.bias, approximate, transposed=True)
    return None


def _hf_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                  **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention interface (q, k, v: (batch, heads, seq, head_dim)) on ``kernels.flash_attention``.

    transformers builds a mask only when it cannot be a plain causal one (padding): then its SDPA runs.
    """
    if attention_mask is not None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                      dropout=dropout, **kwargs)
    causal = getattr(module, "is_causal", True)
    out = kernels.flash_attention(query, key, value, causal=causal, dropout_p=dropout, scale=scaling)
    return out.transpose(1, 2), None  # transformers expects (batch, seq, heads, head_dim)


def _causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, vocab_size: int,
                    num_items_in_batch: torch.Tensor | int | None = None, ignore_index: int = -100,
                    shift_labels: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
    """transformers' causal-LM loss (position t predicts label t + 1; the mean over the labels that
    are not ``ignore_index``, or their sum over ``num_items_in_batch``) on ``kernels.cross_entropy``."""
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    shift_labels = shift_labels.to(logits.device)
    if num_items_in_batch is None:
        return kernels.cross_entropy(logits, shift_labels, ignore_index, num_classes=vocab_size)
    total = kernels.cross_entropy(logits, shift_labels, ignore_index, reduction="sum", num_classes=vocab_size)
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


def _use_flash_attention(model: nn.Module) -> None:
    """Route a transformers GPT-2's attention through :func:`_hf_attention`."""
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError:  # transformers before the attention registries (4.5x)
        warnings.warn("this transformers version has no AttentionMaskInterface: its GPT-2 attention is "
                      "left as it is (LayerNorm and bias + GELU are patched)", stacklevel=3)
        return

    AttentionInterface.register(ATTENTION_NAME, _hf_attention)
    # sdpa_mask returns None when the plain causal mask will do: exactly when the flash kernel can run.
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
    model.set_attn_implementation(ATTENTION_NAME)


def _is_transformers_gpt2(module: nn.Module) -> bool:
    config = getattr(module, "config", None)
    return (_from_transformers(module) and getattr(config, "model_type", None) == "gpt2"
            and hasattr(module, "set_attn_implementation"))


def _is_transformers_causal_lm(module: nn.Module) -> bool:
    """A transformers model whose ``loss_function`` is the causal-LM loss and can be set (transformers
    versions without that setter keep their own loss)."""
    loss_function = getattr(type(module), "loss_function", None)
    return (_from_transformers(module) and isinstance(loss_function, property) and loss_function.fset is not None
            and type(module).__name__.endswith(("ForCausalLM", "LMHeadModel"))
            and getattr(module, "loss_type", None) in (None, "ForCausalLM"))


def patch(model: nn.Module) -> nn.Module:
    """Swap gptfast's fused kernels into ``model`` in place and return it (see the module docstring).

    Parameters stay the same tensors under the same state-dict names, so the patched model loads
    and saves the original's state dicts. Patching twice changes nothing more.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"patch needs a torch.nn.Module, got {type(model).__name__}")
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is nn.LayerNorm and len(child.normalized_shape) == 1:
                setattr(module, name, FusedLayerNorm.replacing(child))
        if isinstance(module, nn.Sequential):
            for i in range(len(module) - 1):
                fused = _fuse_linear_gelu(module[i], module[i + 1])
                if fused is not None:
                    module[i], module[i + 1] = fused, nn.Identity()
        elif _from_transformers(module) and type(module).__name__ == "GPT2MLP":
            fused = _fuse_linear_gelu(module.c_fc, module.act)
            if fused is not None:
                module.c_fc, module.act = fused, nn.Identity()
        if _is_transformers_gpt2(module) and module.config._attn_implementation != ATTENTION_NAME:
            _use_flash_attention(module)
        if _is_transformers_causal_lm(module):
            module.loss_function = _causal_lm_loss
    return model
