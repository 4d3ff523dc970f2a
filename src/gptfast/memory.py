"""Memory estimates: what a model and its training need, computed from the configuration alone, so
that a size that cannot fit is refused before anything is allocated.

:func:`parameter_count` counts a :class:`~gptfast.model.GPTConfig`'s parameters by formula (building
even a meta-device model of a million layers takes hours), :func:`sharded_parameter_count` those of
one FSDP rank. :func:`model_bytes` adds the Python objects of its modules; :func:`training_estimate`
splits what one GPU needs to train, for a world size, a parallelism (DDP or FSDP) and an activation
checkpointing mode, into parameters, gradients, optimizer state and activations (:class:`MemoryEstimate`);
``gptfast info`` and the training banner print it. :func:`available_bytes` is what a device has free,
:func:`total_bytes` all it has.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Protocol

import torch


class GPTConfig(Protocol):
    """The sizes of a :class:`gptfast.model.GPTConfig` that the estimates read (model.py imports this
    module, so it is described here rather than imported)."""

    vocab_size: int
    padded_vocab_size: int
    context_length: int
    n_embd: int
    n_layer: int
    bias: bool
    qkv_bias: bool
    tie_weights: bool
    fused_lm_head: bool

# The Python objects of one Block's eleven modules (their dicts, hooks, parameters' wrappers), measured
# with tracemalloc on a meta-device model: 60 KB a layer, whatever its width.
MODULE_BYTES_PER_LAYER = 60_000
# Values per token and per n_embd that one block keeps for the backward pass: its LayerNorms' inputs and
# outputs, q, k, v, the attention output, the MLP's 4 * n_embd before and after the GELU. A CPU step's
# measured peak (tiny models, float32, tests/test_memory.py) is 0.85 to 1.16 times the estimated gradients and
# activations, in every activation checkpointing mode.
ACTIVATIONS_PER_LAYER = 16
# What each activation checkpointing mode (gptfast.activation_checkpointing) keeps of a block, in the same
# values per token and n_embd: "selective" keeps the outputs of the four projections (3 + 1 + 4 + 1) and of
# attention (1) and the block's two inputs, "full" the two inputs only. Either recomputes one block's
# activations at a time in the backward pass, which the estimate adds once.
KEPT_PER_LAYER = {"none": ACTIVATIONS_PER_LAYER, "selective": 12, "full": 2}
ADAM_STATES = 2  # AdamW's moments, each the size of the parameters, in float32
PARALLELISMS = ("ddp", "fsdp")  # every GPU holds the whole model; or each holds 1/world_size of it
# FSDP gathers a block's parameters whole for its forward and backward while the next one is fetched.
GATHERED_BLOCKS = 2


def _block_shapes(config: GPTConfig) -> list[tuple[int, ...]]:
    """The shapes of one block's parameters, in GPT's order."""
    C, bias = config.n_embd, config.bias
    norm = [(C,), (C,)] if bias else [(C,)]
    attention = [(3 * C, C), *([(3 * C,)] if config.qkv_bias else []), (C, C), *([(C,)] if bias else [])]
    mlp = [(4 * C, C), *([(4 * C,)] if bias else []), (C, 4 * C), *([(C,)] if bias else [])]
    return norm + attention + norm + mlp


def _root_shapes(config: GPTConfig) -> list[tuple[int, ...]]:
    """The shapes of the parameters outside the blocks: embeddings, the last LayerNorm, an untied head."""
    C, V = config.n_embd, config.padded_vocab_size
    head = [] if config.tie_weights else [(V, C)]
    return [(V, C), (config.context_length, C), *([(C,), (C,)] if config.bias else [(C,)]), *head]


def _elements(shapes: list[tuple[int, ...]], world_size: int = 1) -> int:
    """The elements of ``shapes``, or of the largest shard of each when split along its first dimension
    over ``world_size`` processes (FSDP2's sharding: ceil(rows / world_size) rows on the first ranks)."""
    total = 0
    for rows, *rest in shapes:
        n = -(-rows // world_size)
        for size in rest:
            n *= size
        total += n
    return total


def parameter_count(config: GPTConfig) -> int:
    """``GPT(config).num_parameters()``, from the sizes alone (tied weights counted once)."""
    return _elements(_root_shapes(config)) + config.n_layer * _elements(_block_shapes(config))


def sharded_parameter_count(config: GPTConfig, world_size: int) -> int:
    """The parameters of the rank holding the most (rank 0) when every block and the root are
    sharded by FSDP's ``fully_shard`` over ``world_size`` processes."""
    return _elements(_root_shapes(config), world_size) + config.n_layer * _elements(_block_shapes(config), world_size)


def model_bytes(config: GPTConfig, dtype: torch.dtype = torch.float32) -> int:
    """The bytes ``GPT(config)`` takes: its parameters in ``dtype`` and its modules' Python objects."""
    return parameter_count(config) * dtype.itemsize + config.n_layer * MODULE_BYTES_PER_LAYER


@dataclass(frozen=True)
class MemoryEstimate:
    """The bytes one training process (one GPU) needs, by what holds them."""

    parameters: int
    gradients: int
    optimizer: int
    activations: int

    @property
    def total(self) -> int:
        return self.parameters + self.gradients + self.optimizer + self.activations

    def describe(self) -> str:
        parts = ("parameters", "gradients", "optimizer", "activations")
        return ", ".join(f"{part} {gigabytes(getattr(self, part))}" for part in parts)


def training_estimate(config: GPTConfig, batch_size: int, amp_dtype: torch.dtype | None, *,
                      context_length: int | None = None, world_size: int = 1, parallel: str = "ddp",
                      activation_checkpointing: str = "none") -> MemoryEstimate:
    """What one process needs to train ``config`` at ``batch_size`` sequences of ``context_length``
    tokens (the config's by default) per micro-batch: float32 parameters, gradients and AdamW state,
    and the activations kept for the backward pass (in the autocast dtype ``amp_dtype``, float32
    without), the logits' too unless the LM head is fused.

    ``parallel="ddp"``: every process holds the whole model. ``"fsdp"``: each holds its shards of the
    parameters, gradients and optimizer state (:func:`sharded_parameter_count`), plus the parameters
    gathered whole for compute in ``amp_dtype`` (the root's and :data:`GATHERED_BLOCKS` blocks') and
    the float32 gradients of the root and one block before they are reduce-scattered. Activations
    do not depend on the parallelism: ``activation_checkpointing`` (:data:`KEPT_PER_LAYER`) sets them.
    """
    if parallel not in PARALLELISMS:
        raise ValueError(f"unknown parallelism {parallel!r}: choose one of {', '.join(PARALLELISMS)}")
    if activation_checkpointing not in KEPT_PER_LAYER:
        raise ValueError(f"unknown activation checkpointing mode {activation_checkpointing!r}: choose one of "
                         f"{', '.join(KEPT_PER_LAYER)}")
    if world_size < 1:
        raise ValueError(f"world size must be positive, got {world_size}")
    amp_bytes = (amp_dtype or torch.float32).itemsize
    tokens = batch_size * (context_length or config.context_length)
    kept = KEPT_PER_LAYER[activation_checkpointing]
    values = (config.n_layer * kept + ACTIVATIONS_PER_LAYER - kept) * config.n_embd
    activations = tokens * values * amp_bytes
    if not config.fused_lm_head:
        activations += 2 * tokens * config.padded_vocab_size * 4  # the logits and their gradient
    modules = config.n_layer * MODULE_BYTES_PER_LAYER
    if parallel == "ddp":
        n = parameter_count(config)
        return MemoryEstimate(parameters=n * 4 + modules, gradients=n * 4, optimizer=ADAM_STATES * n * 4,
                              activations=activations)
    n = sharded_parameter_count(config, world_size)
    root, block = _elements(_root_shapes(config)), _elements(_block_shapes(config))
    gathered = (root + min(GATHERED_BLOCKS, config.n_layer) * block) * amp_bytes
    return MemoryEstimate(parameters=n * 4 + modules + gathered, gradients=(n + root + block) * 4,
                          optimizer=ADAM_STATES * n * 4, activations=activations)


def gigabytes(n: int) -> str:
    return f"{n / 2**30:,.2f} GB" if n >= 2**27 else f"{n / 2**20:,.1f} MB"


def total_bytes(device: torch.device) -> int | None:
    """All the memory of ``device`` (the machine's RAM for the CPU); None where it is not known (meta)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    if device.type != "cpu":
        return None
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):  # no sysconf (Windows)
        return None


def available_bytes(device: torch.device) -> int | None:
    """The memory ``device`` has free now (the CPU: MemAvailable of /proc/meminfo); None where not known."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as f:
            line = next(line for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):  # not Linux
        return None
    return int(line.split()[1]) * 1024


def check_model_fits(config: GPTConfig, device: torch.device, source: str) -> None:
    """Refuse, before building it, a model whose float32 weights exceed all of ``device``'s memory."""
    needed, memory = model_bytes(config), total_bytes(device)
    if memory is not None and needed > memory:
        gpu = f"{device}'s " if device.type == "cuda" else ""
        raise ValueError(f"{source}: a model of vocab_size {config.vocab_size}, n_embd {config.n_embd}, "
                         f"{config.n_layer} layers has {parameter_count(config):,} parameters and needs "
                         f"{gigabytes(needed)} in float32, more than this machine's {gpu}{gigabytes(memory)} "
                         "of memory")
