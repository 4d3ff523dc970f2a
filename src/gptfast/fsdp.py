"""Sharded training (``--parallel fsdp``): the model built on the meta device, sharded with PyTorch's
FSDP2 (``fully_shard``), then initialised shard by shard.

Each block is one FSDP unit and the root (embeddings, final LayerNorm, LM head) another: a block's
weights are gathered for its forward and backward and freed after, its gradients reduce-scattered
as the backward leaves it. The mixed-precision policy replaces autocast on this path: bfloat16
weights for the compute when the run's dtype is bfloat16, gradients reduced in float32, and the
optimizer updates the float32 shards (the master weights). The tied ``wte``/LM-head matrix belongs
to the root unit, whose weights stay gathered from the root's forward to its backward, so the fused
LM head + loss (outside any block's forward) reads the whole matrix as a plain tensor.

:func:`init_gpt2_weights` draws every parameter whole on the CPU from a generator seeded by the
run's seed and the parameter's index, and keeps the local shard: the initial weights are the same
at every world size, sharded or not (one parameter at a time is whole in memory).
"""

from __future__ import annotations

import warnings

import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_state_dict,
)
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from .activation_checkpointing import apply_activation_checkpointing
from .config import TrainConfig, named
from .distributed import World
from .model import GPT, GPTConfig, initial_std


def check_fsdp_options(cfg: TrainConfig, amp_dtype: torch.dtype | None) -> None:
    """Refuse what sharded training cannot do, in one line naming the options."""
    if cfg.parallel != "fsdp":
        if cfg.reshard_after_forward:
            raise ValueError(f"{named('reshard_after_forward', True)} applies to {named('parallel', 'fsdp')} only")
        return
    if amp_dtype == torch.float16:
        raise ValueError(f"{named('parallel', 'fsdp')} computes in bfloat16 or float32: float16 would need a "
                         f"sharded loss scaler; choose {named('dtype', 'bf16')} or {named('dtype', 'fp32')}")


def sharded_model(config: GPTConfig, world: World, device: torch.device, amp_dtype: torch.dtype | None,
                  reshard_after_forward: bool = False, compile: bool = False,
                  activation_checkpointing: str = "none") -> GPT:
    """A GPT built on the meta device and sharded over ``world``'s processes, its local shards allocated
    on ``device`` but not yet initialised (:func:`init_gpt2_weights`, or a checkpoint's weights)."""
    # Each block returns its stream as a view; nothing changes it in place after, which the warning is about.
    warnings.filterwarnings("ignore", "FSDP2-wrapped module .* returned a view tensor", UserWarning)
    with torch.device("meta"):
        model = GPT(config)
    apply_activation_checkpointing(model, activation_checkpointing)  # to the blocks, before compile and sharding
    mesh = DeviceMesh.from_group(world.group, device.type)
    policy = MixedPrecisionPolicy(param_dtype=amp_dtype, reduce_dtype=torch.float32)
    for block in model.transformer.h:
        if compile:
            block.compile()
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    return model.to_empty(device=device)


@torch.no_grad()
def init_gpt2_weights(model: GPT, seed: int) -> GPT:
    """Set every parameter by GPT-2's scheme (:func:`~gptfast.model.initial_std`), each drawn whole on the
    CPU from a generator seeded by (``seed``, its index), then the shard this process holds kept: the
    same weights at any world size, sharded or not."""
    for index, (name, param) in enumerate(model.named_parameters()):
        std = initial_std(name, model.config)
        if std is None:
            whole = torch.zeros(param.shape) if name.endswith("bias") else torch.ones(param.shape)
        else:
            generator = torch.Generator().manual_seed(seed * 1_000_003 + index)
            whole = torch.normal(0.0, std, param.shape, generator=generator)
        if isinstance(param, DTensor):  # each process drew the same whole tensor: no communication
            whole = distribute_tensor(whole, param.device_mesh, param.placements, src_data_rank=None).to_local()
            param = param.to_local()
        param.copy_(whole)
    return model


def load_whole(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, whole: torch.nn.Module,
               whole_optimizer: torch.optim.Optimizer | None) -> None:
    """Copy a whole model's weights (and its optimizer's state) into ``model``'s shards (and ``optimizer``'s):
    every process holds the whole and keeps its part."""
    whole_options = StateDictOptions(full_state_dict=True)
    if optimizer is None:
        set_model_state_dict(model, whole.state_dict(), options=whole_options)
        return
    set_state_dict(model, optimizer, model_state_dict=whole.state_dict(),
                   optim_state_dict=get_optimizer_state_dict(whole, whole_optimizer), options=whole_options)


def whole_model(model: GPT, world: World) -> GPT | None:
    """The sharded ``model`` gathered whole onto the main process's CPU (every process calls it; the others
    get None)."""
    weights = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not world.main:
        return None
    whole = GPT(model.config)
    whole.load_state_dict(weights)
    return whole


def local(tensor: torch.Tensor) -> torch.Tensor:
    """The part of ``tensor`` this process holds: its shard if it is sharded, else itself."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor
