"""Memory estimates: what a model and its training need, computed from the configuration alone, so
that a size that cannot fit is refused before anything is allocated.

:func:`parameter_count` counts a :class:`~gptfast.model.GPTConfig`'s parameters by formula (building
even a meta-device model of a million layers takes hours). :func:`model_bytes` adds the Python objects
of its modules; :func:`training_estimate` splits a training process's needs into parameters,
gradients, optimizer state and activations (:class:`MemoryEstimate`, the form a sharded run extends:
each part per GPU). :func:`available_bytes` is what a device has free, :func:`total_bytes` all it has.
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
# outputs, q, k, v, the attention output, the MLP's 4 * n_embd before and after the GELU. A floor: a step's
# measured peak (tiny, CPU) is 1.3 times the estimate, with the backward's transients, so a refusal is sure.
ACTIVATIONS_PER_LAYER = 16
ADAM_STATES = 2  # AdamW's moments, each the size of the parameters, in float32


def parameter_count(config: GPTConfig) -> int:
    """``GPT(config).num_parameters()``, from the sizes alone (tied weights counted once)."""
    C, V = config.n_embd, config.padded_vocab_size
    norm = C * (2 if config.bias else 1)
    bias = 1 if config.bias else 0
    block = (2 * norm + 3 * C * C + (3 * C if config.qkv_bias else 0) + C * C + bias * C
             + 4 * C * C + bias * 4 * C + 4 * C * C + bias * C)
    head = 0 if config.tie_weights else V * C
    return V * C + config.context_length * C + config.n_layer * block + norm + head


def model_bytes(config: GPTConfig, dtype: torch.dtype = torch.float32) -> int:
    """The bytes ``GPT(config)`` takes: its parameters in ``dtype`` and its modules' Python objects."""
    return parameter_count(config) * dtype.itemsize + config.n_layer * MODULE_BYTES_PER_LAYER


@dataclass(frozen=True)
class MemoryEstimate:
    """The bytes one training process needs, by what holds them."""

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


def training_estimate(config: GPTConfig, batch_size: int, amp_dtype: torch.dtype | None) -> MemoryEstimate:
    """What training ``config`` at ``batch_size`` sequences of its context length per micro-batch needs:
    float32 parameters, gradients and AdamW state, and the activations kept for the backward pass (in
    the autocast dtype ``amp_dtype``, float32 without), the logits' too unless the LM head is fused."""
    weights = model_bytes(config)
    tokens = batch_size * config.context_length
    values = config.n_layer * ACTIVATIONS_PER_LAYER * config.n_embd
    activations = tokens * values * (amp_dtype or torch.float32).itemsize
    if not config.fused_lm_head:
        activations += 2 * tokens * config.padded_vocab_size * 4  # the logits and their gradient
    n = parameter_count(config) * 4
    return MemoryEstimate(parameters=weights, gradients=n, optimizer=ADAM_STATES * n, activations=activations)


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
