"""Training: ``train(TrainConfig(...))``, which ``gptfast train`` calls, on one device or many.

One optimizer step reads ``grad_accum`` micro-batches on each of ``world_size`` processes; the
micro-batches of a step are drawn together and dealt out by rank, so two processes with
accumulation 1 see exactly the batches one process with accumulation 2 sees. Under ``torchrun``
(``WORLD_SIZE`` > 1) the model is wrapped in DistributedDataParallel, NCCL on GPUs, gloo on CPUs.

Stopping and resuming: the first Ctrl-C (or SIGTERM) finishes the current step, writes the
checkpoint and returns; a second one interrupts at once. ``resume=True`` continues from the
checkpoint exactly: the data stream's position and generator are saved, and dropout's random
numbers are re-seeded at every step from (seed, step, rank), so no other RNG state is needed.
Options that fix what the run computes (:data:`FIXED_ON_RESUME`) default to the checkpoint's when
resuming and may not contradict it; the others (:data:`CHANGEABLE_ON_RESUME`) are applied and printed.

What a run never loses: a checkpoint is written only when the weights, the optimizer state and the
validation loss are finite (a diverging run stops with an error naming the step, the previous
checkpoint kept); one run at a time holds ``out_dir`` (an advisory lock a dead process releases).

This module holds the configuration, the optimizer and its step, and the loop. The rest lives where
``eval``, ``generate`` and the benchmarks import it without importing training: the validation loss
in :mod:`gptfast.evaluate`, autocast and loss scaling in :mod:`gptfast.precision`, the processes in
:mod:`gptfast.distributed`, log.jsonl, progress and the loss plot in :mod:`gptfast.runlog`, Ctrl-C in
:mod:`gptfast.interrupt`, the checkpoint file in :mod:`gptfast.checkpoint`. :func:`make_optimizer`,
:func:`train_step` and :func:`model_flops_per_token` are the pieces the benchmarks reuse, so they
measure the code that trains.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from . import kernels
from .checkpoint import (
    CHECKPOINT_FILE,
    INFERENCE_FIELDS,
    TRAINING_FIELDS,
    build_model,
    checkpoint_path,
    load_checkpoint,
    model_config_from,
    save_checkpoint,
)
from .data import BatchStream, TokenData, is_prepared, prepare
from .distributed import DEFAULT_TIMEOUT_S, World, distributed
from .evaluate import split_loss
from .generation import generate
from .interrupt import StopRequest
from .model import GPT, PRESETS, GPTConfig
from .precision import AMP_DTYPES, amp_dtype_for, autocast, grad_scaler
from .runlog import LOG_FILE, PLOT_FILE, RunLog, Throughput, plot_losses, require_tensorboard
from .tokenizer import Tokenizer

# Dense bf16 tensor-core peaks (FLOP/s) for model FLOPs utilisation; the first name found in the
# device name wins, so the more specific names come first.
PEAK_BF16_FLOPS = {"H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12,
                   "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10G": 70e12, "RTX 4090": 165e12}


@dataclass
class TrainConfig:
    """Everything a run needs; ``gptfast train --help`` describes each field.

    A field whose default is None here takes the checkpoint's value when resuming, else the value
    in :data:`DEFAULTS` (``context_length``: the preset's; ``tokenizer``: gpt2 for a Hugging Face
    ``init_from``).
    """

    data: list[str] | None = None  # a prepared folder, or text files/folders; None: the embedded corpus
    tokenizer: str | None = None  # for text that still needs preparing: "char" or "gpt2"
    include: list[str] | None = None  # globs choosing the files found in data folders (name or relative path)
    exclude: list[str] | None = None  # globs leaving files found in data folders out
    tiktoken_file: str | None = None  # local GPT-2 ranks file (or $GPTFAST_TIKTOKEN_FILE)
    out_dir: str = "out"
    init_from: str | None = None  # start from these weights: gpt2..., a Hugging Face folder, or a checkpoint
    preset: str | None = None  # the model size, when not init_from
    context_length: int | None = None  # None: the preset's (or init_from's, which it may shorten)
    dropout: float | None = None
    batch_size: int | None = None  # sequences per micro-batch and process
    grad_accum: int | None = None  # micro-batches per optimizer step and process
    tokens_per_step: int | None = None  # when given, sets grad_accum to reach this many tokens per step
    max_steps: int = 500  # length of the learning-rate schedule
    run_steps: int | None = None  # stop (with a checkpoint) after this many steps in this run
    lr: float = 1e-3
    min_lr: float | None = None  # end of the cosine decay; None: lr / 10
    warmup_steps: int = 50
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0 disables clipping
    label_smoothing: float = 0.0  # of the loss, as F.cross_entropy defines it
    z_loss: float = 0.0  # weight of PaLM's auxiliary loss, z_loss * logsumexp(logits)**2 per position
    eval_interval: int = 100  # validate and checkpoint every this many steps (and at the end)
    eval_batches: int = 10
    log_interval: int = 10
    order: str | None = None  # batch order: "random" or "sequential"
    seed: int | None = None
    backend: str = "auto"  # kernel backend while train() runs: "auto", "triton" or "torch"
    device: str = "auto"  # "auto": the process's GPU under torchrun, else cuda if present, else cpu
    dtype: str = "auto"  # autocast; "auto": bfloat16 on GPUs that have it, float16 on older ones, float32 on CPUs
    compile: bool = False
    deterministic: bool = True  # False: attention's dQ by atomics: faster backward, not bitwise reproducible
    resume: bool = False
    overwrite: bool = False  # start afresh even if out_dir holds a checkpoint
    sample_tokens: int = 300  # tokens generated at the end (0: none)
    sample_prompt: str = "\n"
    progress: bool = True  # a progress bar on a terminal (else, and when False, a line per log_interval)
    tensorboard: bool = False  # also log the scalars of log.jsonl to OUT_DIR/tensorboard (needs tensorboard)
    ddp_timeout: float = DEFAULT_TIMEOUT_S  # seconds a collective may wait for a peer under torchrun

    def __post_init__(self) -> None:
        if isinstance(self.data, (str, os.PathLike)):
            self.data = [str(self.data)]
        for name in ("include", "exclude"):
            if isinstance(getattr(self, name), str):
                setattr(self, name, [getattr(self, name)])
        if self.preset is not None and self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}: choose one of {', '.join(PRESETS)}")
        for name in ("batch_size", "grad_accum", "max_steps", "eval_interval", "eval_batches", "log_interval"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.run_steps is not None and self.run_steps < 1:
            raise ValueError(f"run_steps must be positive, got {self.run_steps}")
        if self.resume and self.overwrite:
            raise ValueError(f"{option('resume', True)} and {option('overwrite', True)} contradict each other: "
                             "choose one")
        if self.dtype not in AMP_DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(AMP_DTYPES)}, got {self.dtype!r}")
        if self.backend not in kernels.BACKENDS:
            raise ValueError(f"unknown backend {self.backend!r}: choose one of {', '.join(kernels.BACKENDS)}")
        if not 0.0 <= self.label_smoothing <= 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1], got {self.label_smoothing}")
        if not 0.0 <= self.z_loss < math.inf:
            raise ValueError(f"z_loss must be a finite number >= 0, got {self.z_loss}")
        if self.ddp_timeout <= 0:
            raise ValueError(f"ddp_timeout must be positive, got {self.ddp_timeout}")


# What a field set to None becomes when there is no checkpoint to take it from.
DEFAULTS = {"preset": "tiny", "dropout": 0.0, "batch_size": 16, "grad_accum": 1, "order": "random", "seed": 1337,
            "tokenizer": "char", "include": [], "exclude": []}
# Options that fix what a run computes: on resume they default to the checkpoint's and may not contradict it.
FIXED_ON_RESUME = ("data", "tokenizer", "include", "exclude", "init_from", "preset", "context_length", "dropout",
                   "batch_size", "grad_accum", "order", "seed")
# Options a resumed run may change; a change is applied and printed.
CHANGEABLE_ON_RESUME = ("max_steps", "lr", "min_lr", "warmup_steps", "weight_decay", "beta1", "beta2", "grad_clip",
                        "label_smoothing", "z_loss", "eval_interval", "eval_batches", "log_interval", "dtype")

_CLI_OPTIONS = contextvars.ContextVar("gptfast_cli_options", default=False)


def option(name: str, value: object = None) -> str:
    """How a message names a TrainConfig field: ``resume=True`` to Python callers, ``--resume`` in the CLI."""
    if _CLI_OPTIONS.get():
        flag = "--" + name.replace("_", "-")
        return flag if value is None or value is True else f"{flag} {value}"
    return name if value is None else f"{name}={value!r}"


@contextlib.contextmanager
def cli_options() -> Iterator[None]:
    """Inside this block, messages name options as command-line flags (the CLI's train command)."""
    token = _CLI_OPTIONS.set(True)
    try:
        yield
    finally:
        _CLI_OPTIONS.reset(token)


def model_flops_per_token(config: GPTConfig, seq_len: int | None = None) -> float:
    """Training FLOPs per token: 6 per weight (forward + backward) plus attention's 12 * layers * T * width.

    The weights exclude the position embeddings (a lookup, not a matmul); the attention term counts
    the full T x T score matrix, as PaLM's MFU does.
    """
    with torch.device("meta"):
        n = GPT(config).num_parameters(exclude_position_embeddings=True)
    T = seq_len or config.context_length
    return 6.0 * n + 12.0 * config.n_layer * T * config.n_embd


def peak_flops(device: torch.device) -> float | None:
    """The device's dense bf16 peak, when it is a GPU in :data:`PEAK_BF16_FLOPS`."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_FLOPS.items() if key in name), None)


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float = 0.1,
                   betas: tuple[float, float] = (0.9, 0.95)) -> torch.optim.AdamW:
    """AdamW decaying the matrices (linear weights, embeddings) only, fused on CUDA."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    fused = all(p.is_cuda for p in params)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused or None)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up over ``warmup_steps``, then cosine decay to ``min_lr`` at ``max_steps``."""
    min_lr = cfg.lr / 10 if cfg.min_lr is None else cfg.min_lr
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    return min_lr + 0.5 * (cfg.lr - min_lr) * (1 + math.cos(math.pi * min(progress, 1.0)))


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
               batches: list[tuple[torch.Tensor, torch.Tensor]], *, lr: float, grad_clip: float = 1.0,
               amp_dtype: torch.dtype | None = None, scaler: torch.amp.GradScaler | None = None,
               label_smoothing: float = 0.0, z_loss: float = 0.0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One optimizer step over micro-batches ``[(x, y), ...]``; returns (mean loss, gradient norm).

    The loss and norm stay on the device (no host sync). Under DDP, gradients are averaged
    across processes once, on the last micro-batch. ``scaler`` (float16 autocast) scales the loss
    so small gradients survive float16; the gradients are unscaled before clipping, and a step
    whose gradients overflowed is skipped (the scale then halves).
    """
    for group in optimizer.param_groups:
        group["lr"] = lr
    device_type = batches[0][0].device.type
    total = torch.zeros((), device=batches[0][0].device)
    for i, (x, y) in enumerate(batches):
        last = i == len(batches) - 1
        no_sync = model.no_sync() if isinstance(model, DistributedDataParallel) and not last \
            else contextlib.nullcontext()
        with no_sync:
            with autocast(device_type, amp_dtype):
                _, loss = model(x, y, label_smoothing=label_smoothing, z_loss=z_loss)
            scaled = loss / len(batches)
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
        total += loss.detach()
    if scaler is not None:
        scaler.unscale_(optimizer)
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip) if grad_clip > 0 else None
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total / len(batches), norm


def _open_data(cfg: TrainConfig, world: World) -> TokenData:
    """The prepared data: ``cfg.data`` itself, or text prepared into ``out_dir/data`` (once per run)."""
    if cfg.data and len(cfg.data) == 1 and is_prepared(cfg.data[0]):
        return TokenData(cfg.data[0])
    data_dir = Path(cfg.out_dir) / "data"
    if world.main and not (cfg.resume and is_prepared(data_dir)):
        meta = prepare(cfg.data, data_dir, tokenizer=cfg.tokenizer, tiktoken_file=cfg.tiktoken_file,
                       include=cfg.include, exclude=cfg.exclude, skip=[cfg.out_dir])
        print(f"prepared {meta['num_tokens']:,} tokens from {', '.join(meta['sources'])} into {data_dir}")
    world.barrier()
    return TokenData(data_dir)


def _absolute(paths: list[str] | None) -> list[str] | None:
    return None if paths is None else [os.path.abspath(os.path.expanduser(p)) for p in paths]


def _is_gptfast_checkpoint(source: str) -> bool:
    path = Path(source).expanduser()
    return path.is_file() or (path / CHECKPOINT_FILE).is_file()


def _settle(cfg: TrainConfig, state: dict | None, path: Path, world: World) -> TrainConfig:
    """``cfg`` with every None field decided: from the checkpoint when resuming (an option that
    contradicts it is an error listing each conflict), else from :data:`DEFAULTS`."""
    values = {"data": _absolute(cfg.data)}
    if state is None:
        if cfg.init_from and cfg.preset:
            raise ValueError(f"{option('preset', cfg.preset)} and {option('init_from', cfg.init_from)} contradict "
                             "each other: the model is init_from's")
        hugging_face = cfg.init_from and not _is_gptfast_checkpoint(cfg.init_from)
        if hugging_face and cfg.tokenizer not in (None, "gpt2"):
            _require_gpt2_tokens(cfg, cfg.tokenizer)  # before preparing any text
        values.update({k: v for k, v in DEFAULTS.items() if getattr(cfg, k) is None and not (k == "preset" and
                                                                                            cfg.init_from)})
        if cfg.init_from and cfg.tokenizer is None:  # text is tokenized as init_from's model reads it
            values["tokenizer"] = "gpt2" if hugging_face else \
                load_checkpoint(checkpoint_path(cfg.init_from), require=INFERENCE_FIELDS)["tokenizer"].get("kind")
        return dataclasses.replace(cfg, **values)
    saved = dict(state["train_config"])
    saved["data"] = _absolute(saved.get("data"))
    saved["tokenizer"] = state["tokenizer"].get("kind", saved.get("tokenizer"))
    saved["context_length"] = state["model_config"].get("context_length")
    processes = state.get("processes", world.size)
    micro_batches = saved.get("grad_accum", 1) * processes  # per step over all processes
    mine = {**asdict(cfg), **values}
    if cfg.tokens_per_step is not None:
        mine["grad_accum"] = _grad_accum(cfg.tokens_per_step, mine["batch_size"] or saved.get("batch_size", 16),
                                         saved["context_length"], world.size)
    conflicts = []
    for name in FIXED_ON_RESUME:
        if mine[name] is None:
            values[name] = saved.get(name, DEFAULTS.get(name))
        elif name == "grad_accum" and mine[name] * world.size != micro_batches:
            conflicts.append(f"{option(name, mine[name])} x {world.size} process(es) (the checkpoint's: "
                             f"{saved.get(name)} x {processes})")
        elif name != "grad_accum" and mine[name] != saved.get(name):
            conflicts.append(f"{option(name, mine[name])} (the checkpoint's: {saved.get(name)!r})")
        else:
            values[name] = mine[name]
    if conflicts:
        raise ValueError(f"cannot resume {path}: these options contradict the checkpoint: {'; '.join(conflicts)}. "
                         f"Leave them out to use the checkpoint's, or start afresh with {option('overwrite', True)}")
    if cfg.grad_accum is None and cfg.tokens_per_step is None:
        if micro_batches % world.size:
            raise ValueError(f"cannot resume {path} on {world.size} process(es): its steps are {micro_batches} "
                             "micro-batches, which they cannot share evenly")
        values["grad_accum"] = micro_batches // world.size
    settled = dataclasses.replace(cfg, **values)
    changes = [f"{name} {saved[name]!r} -> {getattr(settled, name)!r}" for name in CHANGEABLE_ON_RESUME
               if name in saved and saved[name] != getattr(settled, name)]
    if changes and world.main:
        print(f"resuming with changed options: {', '.join(changes)}")
    return settled


def _grad_accum(tokens_per_step: int, batch_size: int, context_length: int, processes: int) -> int:
    per_micro = batch_size * context_length * processes
    if tokens_per_step % per_micro:
        raise ValueError(f"tokens_per_step {tokens_per_step} is not a multiple of batch_size x "
                         f"context_length x processes = {per_micro}")
    return tokens_per_step // per_micro


def _require_gpt2_tokens(cfg: TrainConfig, kind: str) -> None:
    if kind != "gpt2":
        raise ValueError(f"{option('init_from', cfg.init_from)} is GPT-2, which reads GPT-2 BPE tokens, but the data "
                         f"is tokenized {kind}: prepare it with {option('tokenizer', 'gpt2')}")


def _initial_model(cfg: TrainConfig, tokenizer: Tokenizer) -> GPT:
    """A new run's model (on the CPU): the preset, randomly initialised from the seed, or init_from's
    weights (a gptfast checkpoint, or Hugging Face GPT-2) with this run's context length and dropout."""
    if not cfg.init_from:
        overrides = {"vocab_size": tokenizer.vocab_size, "drop_rate": cfg.dropout}
        if cfg.context_length:
            overrides["context_length"] = cfg.context_length
        return GPT(GPTConfig.from_preset(cfg.preset, **overrides))
    named = option("init_from", cfg.init_from)
    if _is_gptfast_checkpoint(cfg.init_from):
        path = checkpoint_path(cfg.init_from)
        state = load_checkpoint(path, require=INFERENCE_FIELDS)
        if state["tokenizer"] != tokenizer.to_dict():
            theirs = state["tokenizer"].get("kind")
            raise ValueError(f"{named}: that checkpoint's tokenizer ({theirs}"
                             f"{', its own character vocabulary' if theirs == 'char' else ''}) is not the data's: "
                             "train on data tokenized as it was")
        source = build_model(state, path)
    else:
        _require_gpt2_tokens(cfg, tokenizer.to_dict()["kind"])
        from .pretrained import from_pretrained

        source = from_pretrained(cfg.init_from).float()
        if source.config.vocab_size != tokenizer.vocab_size:
            raise ValueError(f"{named} has a vocabulary of {source.config.vocab_size}, GPT-2's tokenizer "
                             f"{tokenizer.vocab_size}: not a GPT-2 vocabulary")
    T = cfg.context_length or source.config.context_length
    if T > source.config.context_length:
        raise ValueError(f"{option('context_length', T)} is longer than {named}'s context of "
                         f"{source.config.context_length}")
    model = GPT(dataclasses.replace(source.config, context_length=T, drop_rate=cfg.dropout))
    weights = source.state_dict()
    weights["transformer.wpe.weight"] = weights["transformer.wpe.weight"][:T]  # a shorter context: its first positions
    model.load_state_dict(weights)
    return model


@dataclass
class _Run:
    """A run in progress: what it trains and with what, and the step it is at.

    The checkpoint is :meth:`state_dict`; ``runner`` is the model as trained (compiled, wrapped in DDP).
    """

    cfg: TrainConfig
    world: World
    device: torch.device
    data: TokenData
    tokenizer: Tokenizer
    prompt: list[int]  # of the final sample, encoded before training so that a bad one fails early
    model: GPT
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    stream: BatchStream
    grad_accum: int
    amp_dtype: torch.dtype | None
    runner: torch.nn.Module | None = None
    step: int = 0
    saved_step: int | None = None  # the step ckpt.pt holds

    @property
    def checkpoint_path(self) -> Path:
        return Path(self.cfg.out_dir) / CHECKPOINT_FILE

    @property
    def tokens_per_step(self) -> int:
        return self.grad_accum * self.world.size * self.cfg.batch_size * self.model.config.context_length

    def train_one_step(self) -> tuple[torch.Tensor, torch.Tensor | None, float]:
        """One optimizer step: (mean loss, gradient norm) on the device, and the learning rate.

        The step's micro-batches are drawn together and dealt out by rank; dropout is re-seeded from
        (seed, step, rank), so a resumed run draws what an uninterrupted one would.
        """
        cfg, world = self.cfg, self.world
        torch.manual_seed(cfg.seed + 1_000_003 * self.step + world.rank)  # dropout's random numbers
        starts = self.stream.next_starts(world.size * self.grad_accum * cfg.batch_size)
        mine = starts.view(world.size, self.grad_accum, cfg.batch_size)[world.rank]
        batches = [self.stream.batch(s, self.device) for s in mine]
        lr = lr_at(self.step, cfg)
        loss, norm = train_step(self.runner, self.optimizer, batches, lr=lr, grad_clip=cfg.grad_clip,
                                amp_dtype=self.amp_dtype, scaler=self.scaler, label_smoothing=cfg.label_smoothing,
                                z_loss=cfg.z_loss)
        self.step += 1
        return loss, norm, lr

    def validation_loss(self) -> float:
        """The loss over the validation split's first ``eval_batches`` batches, dealt out by rank."""
        cfg = self.cfg
        loss, _ = split_loss(self.runner, self.data.val, self.model.config.context_length, cfg.batch_size,
                             cfg.eval_batches * cfg.batch_size, self.amp_dtype, self.world)
        return loss

    def state_dict(self) -> dict:
        """The checkpoint: everything a resumed run needs, tensors and plain values only."""
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), "step": self.step,
                "model_config": self.model.config.to_dict(), "train_config": asdict(self.cfg),
                "tokenizer": self.tokenizer.to_dict(), "data": self.stream.state_dict(), "processes": self.world.size,
                **({"scaler": self.scaler.state_dict()} if self.scaler is not None else {})}

    def load_state_dict(self, state: dict) -> None:
        """Restore a checkpoint; a field that does not fit is an error naming it. This run's AdamW
        hyperparameters replace the saved ones (the learning rate is set at every step)."""
        parts = [("model", self.model), ("optimizer", self.optimizer), ("data", self.stream)]
        if self.scaler is not None and "scaler" in state:
            parts.append(("scaler", self.scaler))
        for field, part in parts:
            try:
                part.load_state_dict(state[field])
            except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as error:
                details = " ".join(str(error).split())[:300]
                raise ValueError(f"{self.checkpoint_path} is damaged: field {field!r} does not fit this run "
                                 f"({type(error).__name__}: {details})") from None
        for group in self.optimizer.param_groups:
            group["betas"] = (self.cfg.beta1, self.cfg.beta2)
            if group["weight_decay"]:
                group["weight_decay"] = self.cfg.weight_decay
        self.step = self.saved_step = state["step"]

    def nonfinite(self, val_loss: float | None) -> str | None:
        """What is not finite (NaN or Inf), of the weights, the optimizer state and ``val_loss``; None if all is."""
        if val_loss is not None and not math.isfinite(val_loss):
            return f"the validation loss is {val_loss}"
        weights = list(self.model.parameters())
        moments = [t for s in self.optimizer.state.values() for t in s.values()
                   if isinstance(t, torch.Tensor) and t.is_floating_point()]
        finite = torch.stack([torch.isfinite(t).all() for t in weights + moments]).tolist()
        if not all(finite[: len(weights)]):
            return "the weights hold NaN or Inf"
        return None if all(finite) else "the optimizer state holds NaN or Inf"

    def diverged(self, problem: str) -> FloatingPointError:
        """The error that stops a diverging run, saying which step ckpt.pt keeps."""
        kept = (f"{self.checkpoint_path} still holds step {self.saved_step}" if self.saved_step is not None
                else "no checkpoint was written")
        return FloatingPointError(f"step {self.step}: {problem}, so the run stops unsaved; {kept}. "
                                  f"The training diverged: lower {option('lr')} and resume")

    def save(self, val_loss: float | None = None) -> None:
        """Write the checkpoint, from the main process (every process holds the same state), unless
        something in it is not finite: then the run stops with an error and ckpt.pt keeps its step."""
        problem = self.nonfinite(val_loss)
        if problem:
            raise self.diverged(problem)
        if self.world.main:
            save_checkpoint(self.checkpoint_path, self.state_dict())
        self.saved_step = self.step


@contextlib.contextmanager
def _out_dir_lock(out_dir: Path, main: bool) -> Iterator[None]:
    """Hold ``out_dir/.lock`` (an advisory lock: a second run refuses, naming the holder's pid; the
    lock dies with its process, so a killed run never blocks the next). A no-op without fcntl."""
    try:
        import fcntl
    except ImportError:  # Windows
        fcntl = None
    if not main or fcntl is None:
        yield
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / ".lock", "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock.seek(0)
            holder = lock.read().strip() or "unknown"
            raise BlockingIOError(f"{str(out_dir)!r} is in use by another training run (pid {holder}): wait for "
                                  f"it to finish, stop it, or choose another {option('out_dir')}") from None
        lock.truncate(0)
        lock.write(f"{os.getpid()}\n")
        lock.flush()
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def train(cfg: TrainConfig) -> dict:
    """Train, validate and checkpoint as ``cfg`` says; returns a summary of the run.

    The summary holds ``step``, ``loss`` (the last step's training loss), ``val_loss`` (the last
    validation), ``checkpoint`` (its path), ``stopped`` (True when a signal or ``run_steps`` ended
    the run early), ``signal`` (the number of the signal that stopped it, or None) and ``sample``
    (generated text, or None). It seeds torch's global generator and selects ``cfg.backend`` while it runs.
    """
    with kernels.use_backend(cfg.backend), distributed(cfg.device, cfg.ddp_timeout) as (world, device), \
            _out_dir_lock(Path(cfg.out_dir), world.main):
        run = _start_run(cfg, world, device)
        try:
            summary = _train(run)
            return _finish(run, summary) if world.main else summary
        finally:
            # DDP's reducer lets go of the process group first: freed last through the reducer, the gloo
            # group's destructor joins its worker threads holding the GIL, which a worker may be waiting
            # for (a hang seen at the end of CPU runs under load); freed through the group, it does not.
            run.runner = None


def _start_run(cfg: TrainConfig, world: World, device: torch.device) -> _Run:
    """The run, checked before its first step: the options (against the checkpoint when resuming),
    the data and tokenizer, the model, its optimizer, loss scaler and batch stream."""
    path = Path(cfg.out_dir) / CHECKPOINT_FILE
    if cfg.resume and not path.is_file():
        raise FileNotFoundError(f"cannot resume: no checkpoint at {str(path)!r}")
    if not cfg.resume and not cfg.overwrite and path.is_file():
        raise FileExistsError(f"{str(path)!r} exists: pass {option('resume', True)} to continue that run or "
                              f"{option('overwrite', True)} to start afresh (or choose another {option('out_dir')})")
    if cfg.tensorboard:
        require_tensorboard()
    state = load_checkpoint(path, require=TRAINING_FIELDS) if cfg.resume else None
    cfg = _settle(cfg, state, path, world)
    data = _open_data(cfg, world)
    tokenizer = data.tokenizer(cfg.tiktoken_file)
    prompt = tokenizer.encode(cfg.sample_prompt) if cfg.sample_tokens else []
    if state is not None and state["tokenizer"] != tokenizer.to_dict():
        raise ValueError(f"the checkpoint was trained with another tokenizer than {data.dir}'s: "
                         "resume with the data it was trained on")
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    if state is not None:
        model = GPT(model_config_from(state["model_config"], f"{path}: field 'model_config'"))
    else:
        model = _initial_model(cfg, tokenizer)
    model.config.deterministic_attention = cfg.deterministic
    model = model.to(device)
    T = model.config.context_length
    grad_accum = cfg.grad_accum if cfg.tokens_per_step is None else \
        _grad_accum(cfg.tokens_per_step, cfg.batch_size, T, world.size)
    amp_dtype = amp_dtype_for(cfg.dtype, device)
    optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2))
    stream = BatchStream(data.train, T, order=cfg.order, seed=cfg.seed)
    BatchStream(data.val, T, split="validation")  # fail now, not at the first validation
    run = _Run(cfg, world, device, data, tokenizer, prompt, model, optimizer, grad_scaler(amp_dtype, device),
               stream, grad_accum, amp_dtype)
    if state is not None:
        run.load_state_dict(state)
        if run.step >= cfg.max_steps:
            raise ValueError(f"the checkpoint is at step {run.step}, already at max_steps {cfg.max_steps}: "
                             f"raise {option('max_steps')} to train further")
    run.runner = torch.compile(model) if cfg.compile else model
    if world.size > 1:
        run.runner = DistributedDataParallel(run.runner, device_ids=[device.index] if device.type == "cuda" else None,
                                             process_group=world.group)
    Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
    if world.main:
        name = cfg.preset or f"from {cfg.init_from}"
        print(f"model: {name} ({model.num_parameters():,} parameters, vocabulary {model.config.vocab_size}, "
              f"context {T}); {run.tokens_per_step:,} tokens per step = {world.size} process(es) x "
              f"{grad_accum} micro-batch(es) x {cfg.batch_size} x {T}; device {device}, "
              f"backend {kernels.get_backend()}" + (f"; resuming at step {run.step}" if cfg.resume else ""))
    return run


def _train(run: _Run) -> dict:
    """The loop: step; log, validate and checkpoint when due; stop at max_steps, after run_steps, or when asked."""
    cfg, world = run.cfg, run.world
    start_step, loss, val_loss, stopped = run.step, None, None, False
    peak = peak_flops(run.device) if run.amp_dtype == torch.bfloat16 else None
    flops_per_step = model_flops_per_token(run.model.config) * run.tokens_per_step
    meter = Throughput(run.step, run.tokens_per_step, flops_per_step, None if peak is None else peak * world.size)
    log = RunLog(Path(cfg.out_dir), main=world.main, resume_step=run.step if cfg.resume else None,
                 step=run.step, max_steps=cfg.max_steps, progress=cfg.progress, tensorboard=cfg.tensorboard)
    with StopRequest(announce=world.main) as stop, log:
        while run.step < cfg.max_steps:
            loss_t, norm, lr = run.train_one_step()
            log.advance()
            if run.step % cfg.log_interval == 0 or run.step == cfg.max_steps:
                loss = world.mean(loss_t).item()
                if not math.isfinite(loss):
                    raise run.diverged(run.nonfinite(None) or f"the training loss is {loss}")
                log.train(run.step, loss, lr, None if norm is None else norm.item(), *meter.measure(run.step))
            if run.step % cfg.eval_interval == 0 or run.step == cfg.max_steps:
                with meter.paused():  # keep validation and the checkpoint out of the tokens-per-second figure
                    val_loss = run.validation_loss()
                    log.validation(run.step, val_loss, loss)
                    run.save(val_loss)
            ran_out = cfg.run_steps is not None and run.step - start_step >= cfg.run_steps
            if world.any(stop.requested, run.device) or (ran_out and run.step < cfg.max_steps):
                stopped = True
                break
        if run.saved_step != run.step:
            run.save()
    loss = world.mean(loss_t).item() if run.step > start_step else loss
    return {"step": run.step, "loss": loss, "val_loss": val_loss, "checkpoint": str(run.checkpoint_path),
            "stopped": stopped, "signal": stop.signum, "sample": None}


def _finish(run: _Run, summary: dict) -> dict:
    """The main process's end of a run: how to continue a stopped one, the loss curve, the sample."""
    cfg, out = run.cfg, Path(run.cfg.out_dir)
    if summary["stopped"]:
        print(f"stopped at step {summary['step']}; checkpoint {run.checkpoint_path} "
              f"(continue with {option('resume', True)})")
    png = plot_losses(out / LOG_FILE, out / PLOT_FILE)
    if png:
        print(f"loss curve: {png}")
    else:
        print(f"no loss plot: matplotlib is not installed (pip install matplotlib); the losses are in {out / LOG_FILE}")
    if not summary["stopped"] and cfg.sample_tokens > 0:
        run.model.eval()
        eot = run.tokenizer.eot_token_id
        new = generate(run.model, [run.prompt or [eot or 0]], cfg.sample_tokens, temperature=0.8, top_k=50,
                       seed=cfg.seed, eos_token_id=eot)[0]
        summary["sample"] = run.tokenizer.decode(new)
        print(f"\nsample ({cfg.sample_tokens} tokens after {cfg.sample_prompt!r}):\n"
              f"{cfg.sample_prompt}{summary['sample']}")
    return summary
