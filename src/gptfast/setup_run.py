"""What a run starts from: its data (text prepared into ``out_dir/data`` first) and a new run's
model (a preset, randomly initialised, or ``init_from``'s weights), and the check that training it
fits the device's memory. :func:`gptfast.run.start_run` calls them once the options are settled."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from .checkpoint import INFERENCE_FIELDS, build_model, checkpoint_path, load_checkpoint
from .config import TrainConfig, named
from .data import TokenData, is_prepared, prepare
from .distributed import World
from .memory import MemoryEstimate, available_bytes, gigabytes, training_estimate
from .model import GPT, GPTConfig
from .precision import amp_dtype_for
from .resume import is_gptfast_checkpoint, require_gpt2_tokens
from .tokenizer import Tokenizer


def open_data(cfg: TrainConfig, world: World) -> TokenData:
    """The prepared data: ``cfg.data`` itself, or text prepared into ``out_dir/data`` (once per run)."""
    if cfg.data and len(cfg.data) == 1 and is_prepared(cfg.data[0]):
        return TokenData(cfg.data[0])
    data_dir = Path(cfg.out_dir) / "data"
    missing = [source for source in cfg.data or () if not Path(source).exists()]
    if cfg.resume and missing and not is_prepared(data_dir):
        raise ValueError(f"this run's data {missing[0]} is gone: if it moved, give its new place as DATA with "
                         "--resume (it is checked to be the same data)")
    if world.main and not (cfg.resume and is_prepared(data_dir)):
        meta = prepare(cfg.data, data_dir, tokenizer=cfg.tokenizer, tiktoken_file=cfg.tiktoken_file,
                       include=cfg.include, exclude=cfg.exclude, skip=[cfg.out_dir], text_field=cfg.text_field,
                       strict=cfg.strict, workers=cfg.workers)
        print(f"prepared {meta['num_tokens']:,} tokens from {', '.join(meta['sources'])} into {data_dir}")
    world.barrier()
    return TokenData(data_dir)


def preset_config(cfg: TrainConfig, tokenizer: Tokenizer) -> GPTConfig:
    """A new run's model configuration when it starts from a preset (not ``init_from``)."""
    overrides = {"vocab_size": tokenizer.vocab_size, "drop_rate": cfg.dropout}
    if cfg.context_length:
        overrides["context_length"] = cfg.context_length
    return GPTConfig.from_preset(cfg.preset, **overrides)


def initial_model(cfg: TrainConfig, tokenizer: Tokenizer) -> GPT:
    """init_from's model (on the CPU): a gptfast checkpoint's or Hugging Face GPT-2's weights, with this
    run's context length and dropout."""
    spelled = named("init_from", cfg.init_from)
    if is_gptfast_checkpoint(cfg.init_from):
        path = checkpoint_path(cfg.init_from)
        state = load_checkpoint(path, require=INFERENCE_FIELDS)
        if state["tokenizer"] != tokenizer.to_dict():
            theirs = state["tokenizer"].get("kind")
            raise ValueError(f"{spelled}: that checkpoint's tokenizer ({theirs}"
                             f"{', its own character vocabulary' if theirs == 'char' else ''}) is not the data's: "
                             "train on data tokenized as it was")
        source = build_model(state, path)
    else:
        require_gpt2_tokens(cfg, tokenizer.to_dict()["kind"])
        from .pretrained import from_pretrained

        source = from_pretrained(cfg.init_from).float()
        if source.config.vocab_size != tokenizer.vocab_size:
            raise ValueError(f"{spelled} has a vocabulary of {source.config.vocab_size}, GPT-2's tokenizer "
                             f"{tokenizer.vocab_size}: not a GPT-2 vocabulary")
    T = cfg.context_length or source.config.context_length
    if T > source.config.context_length:
        raise ValueError(f"{named('context_length', T)} is longer than {spelled}'s context of "
                         f"{source.config.context_length}")
    model = GPT(dataclasses.replace(source.config, context_length=T, drop_rate=cfg.dropout))
    weights = source.state_dict()
    weights["transformer.wpe.weight"] = weights["transformer.wpe.weight"][:T]  # a shorter context: its first positions
    model.load_state_dict(weights)
    return model


def memory_estimate(cfg: TrainConfig, config: GPTConfig, device: torch.device, world_size: int) -> MemoryEstimate:
    """What one process of this run needs (:func:`~gptfast.memory.training_estimate`) for its parallelism,
    activation checkpointing and compute dtype on ``device``: the check below and the banner print the
    same figures."""
    return training_estimate(config, cfg.batch_size, amp_dtype_for(cfg.dtype, device), world_size=world_size,
                             parallel=cfg.parallel, activation_checkpointing=cfg.activation_checkpointing)


def check_memory(cfg: TrainConfig, config: GPTConfig, device: torch.device, world_size: int = 1,
                 already_allocated: int = 0) -> None:
    """Refuse, before the model is built and the first step allocates it, a run whose parameters,
    gradients, optimizer state and activations (:func:`memory_estimate`) exceed what ``device`` has
    free; ``already_allocated``: bytes of it that are already there (a source model on the CPU)."""
    estimate = memory_estimate(cfg, config, device, world_size)
    free = available_bytes(device)
    if free is None:
        return
    free += already_allocated if device.type == "cpu" else 0
    if estimate.total > free:
        T = config.context_length
        raise ValueError(f"{named('batch_size', cfg.batch_size)}: training needs about {gigabytes(estimate.total)} "
                         f"on {device} ({estimate.describe()} for {cfg.batch_size} x {T} tokens), but "
                         f"{gigabytes(free)} is available: lower {named('batch_size')} or "
                         f"{named('context_length')}, or choose a smaller model")
