"""Activation checkpointing: keep less of each block's forward for the backward pass, recompute the rest.

:func:`apply_activation_checkpointing` wraps the blocks of a :class:`~gptfast.model.GPT` in place with
PyTorch's ``checkpoint_wrapper`` (non-reentrant ``torch.utils.checkpoint``). Call it before
``torch.compile``, DistributedDataParallel or FSDP's ``fully_shard`` (which then shards the wrapped
blocks). The modes (``--activation-checkpointing``):

- ``none``: every block keeps what its backward reads (the default).
- ``full``: a block keeps only its inputs and recomputes its whole forward in the backward pass.
- ``selective``: a block keeps its matmul outputs (the four projections' and the attention kernel's
  output and log-sum-exp) and recomputes the rest: the LayerNorms, bias + GELU, dropout and the
  reshapes around attention. It is torch's selective checkpointing
  (``create_selective_checkpoint_contexts``) with :func:`_keep_matmuls` as its policy.

Why selective keeps the matmuls rather than checkpointing every other block, measured on a 2-core CPU
(eager backend, float32, 4 layers of width 256, batch 8 x 256; peak by torch's profiler over one
forward and backward, step time the fastest of 6): none 140.6 MiB, 2.20 s; keeping the matmuls
107.3 MiB, 2.09 s, with no matmul recomputed; every other block 82.4 MiB, 2.43 s, recomputing half
the forward's matmuls (+11% of the step's matmul FLOPs, +1/6 at GPT-2's sizes); full 57.3 MiB. Keeping
the matmuls saves a quarter of the memory and recomputes only elementwise work, whose cost is the
selective-checkpointing dispatch's per-operation overhead (+20% at width 128 on that CPU, within
the noise at 256; compiled, it is traced away); every other block saves more but pays in matmuls,
and when memory is what limits ``full`` saves the most. ``tests/test_memory.py``
checks that each mode keeps less than the one before.

Recomputing is bit-identical, dropout included: the attention kernel's Philox seed is drawn from
torch's default CPU generator (``kernels.flash_attention``), whose state checkpointing saves before
the forward and restores for the recomputation, as it does the GPU's generator for ``nn.Dropout``.
No operation the policy keeps draws random numbers (the eager attention, which draws its dropout
itself, is recomputed), so the recomputation draws the same numbers in the same order.
"""

from __future__ import annotations

import functools

import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from . import kernels  # noqa: F401  (registers the gptfast:: operators the policy names)

MODES = ("none", "selective", "full")

_aten = torch.ops.aten
# The operators whose outputs selective checkpointing keeps: matmuls, and the attention kernel (its
# seed is an input, so keeping its output leaves the generator's sequence unchanged).
KEPT_OPS = frozenset({_aten.mm.default, _aten.addmm.default,
                      torch.ops.gptfast.flash_attention_forward.default})


def _keep_matmuls(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in KEPT_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def _selective_contexts():
    return create_selective_checkpoint_contexts(_keep_matmuls)


def _checkpointed(function, *args, **kwargs):
    """``torch.utils.checkpoint`` when gradients are on; without them (validation, generation) the
    block runs as it is: there is nothing to keep."""
    if not torch.is_grad_enabled():
        return function(*args, **{k: v for k, v in kwargs.items() if k != "context_fn"})
    return checkpoint(function, *args, use_reentrant=False, preserve_rng_state=True, **kwargs)


def apply_activation_checkpointing(model: torch.nn.Module, mode: str) -> None:
    """Wrap ``model.transformer.h``'s blocks in place for ``mode`` (one of :data:`MODES`). The state
    dict keeps its keys (the wrapper's hooks strip its prefix); a model wrapped already is refused."""
    if mode not in MODES:
        raise ValueError(f"unknown activation checkpointing mode {mode!r}: choose one of {', '.join(MODES)}")
    if mode == "none":
        return
    blocks = model.transformer.h
    if any(hasattr(block, "_checkpoint_wrapped_module") for block in blocks):
        raise ValueError("activation checkpointing is applied to this model already")
    options = {"context_fn": _selective_contexts} if mode == "selective" else {}
    for i, block in enumerate(blocks):
        blocks[i] = checkpoint_wrapper(block, checkpoint_fn=functools.partial(_checkpointed, **options))
