"""Training: ``train(TrainConfig(...))``, which ``gptfast train`` calls, on one device or many.

One optimizer step reads ``grad_accum`` micro-batches on each of ``world_size`` processes; the
micro-batches of a step are drawn together and dealt out by rank, so two processes with
accumulation 1 see exactly the batches one process with accumulation 2 sees. Under ``torchrun``
(``WORLD_SIZE`` > 1) the model is wrapped in DistributedDataParallel, NCCL on GPUs, gloo on CPUs.

Stopping and resuming: the first Ctrl-C (or SIGTERM) finishes the current step, writes the
checkpoint and returns; a second one interrupts at once. ``resume=True`` continues from the
checkpoint exactly: the data stream's position and generator are saved, and dropout's random
numbers are re-seeded at every step from (seed, step, rank), so no other RNG state is needed.

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
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from . import kernels

from .checkpoint import CHECKPOINT_FILE, load_checkpoint, save_checkpoint
from .data import BatchStream, TokenData, is_prepared, prepare
from .distributed import World, distributed
from .evaluate import split_loss
from .generation import generate
from .interrupt import StopRequest
from .model import GPT, PRESETS, GPTConfig
from .precision import AMP_DTYPES, amp_dtype_for, autocast, grad_scaler
from .runlog import LOG_FILE, PLOT_FILE, RunLog, Throughput, plot_losses
from .tokenizer import Tokenizer

# Dense bf16 tensor-core peaks (FLOP/s) for model FLOPs utilisation; the first name found in the
# device name wins, so the more specific names come first.
PEAK_BF16_FLOPS = {"H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12,
                   "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10G": 70e12, "RTX 4090": 165e12}


@dataclass
class TrainConfig:
    """Everything a run needs; ``gptfast train --help`` describes each field."""

    data: list[str] | None = None  # a prepared folder, or text files/folders; None: the embedded corpus
    tokenizer: str = "char"  # for text that still needs preparing: "char" or "gpt2"
    tiktoken_file: str | None = None  # local GPT-2 ranks file (or $GPTFAST_TIKTOKEN_FILE)
    out_dir: str = "out"
    preset: str = "tiny"
    context_length: int | None = None  # None: the preset's
    dropout: float = 0.0
    batch_size: int = 16  # sequences per micro-batch and process
    grad_accum: int = 1  # micro-batches per optimizer step and process
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
    eval_interval: int = 100  # validate and checkpoint every this many steps (and at the end)
    eval_batches: int = 10
    log_interval: int = 10
    order: str = "random"  # batch order: "random" or "sequential"
    seed: int = 1337
    backend: str = "auto"  # kernel backend while train() runs: "auto", "triton" or "torch"
    device: str = "auto"  # "auto": the process's GPU under torchrun, else cuda if present, else cpu
    dtype: str = "auto"  # autocast; "auto": bfloat16 on GPUs that have it, float16 on older ones, float32 on CPUs
    compile: bool = False
    resume: bool = False
    overwrite: bool = False  # start afresh even if out_dir holds a checkpoint
    sample_tokens: int = 300  # tokens generated at the end (0: none)
    sample_prompt: str = "\n"
    progress: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.data, (str, os.PathLike)):
            self.data = [str(self.data)]
        if self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}: choose one of {', '.join(PRESETS)}")
        for name in ("batch_size", "grad_accum", "max_steps", "eval_interval", "eval_batches", "log_interval"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.run_steps is not None and self.run_steps < 1:
            raise ValueError(f"run_steps must be positive, got {self.run_steps}")
        if self.resume and self.overwrite:
            raise ValueError("resume and overwrite contradict each other: choose one")
        if self.dtype not in AMP_DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(AMP_DTYPES)}, got {self.dtype!r}")
        if self.backend not in kernels.BACKENDS:
            raise ValueError(f"unknown backend {self.backend!r}: choose one of {', '.join(kernels.BACKENDS)}")


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
               amp_dtype: torch.dtype | None = None, scaler: torch.amp.GradScaler | None = None
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
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
                _, loss = model(x, y)
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
        meta = prepare(cfg.data, data_dir, tokenizer=cfg.tokenizer, tiktoken_file=cfg.tiktoken_file)
        print(f"prepared {meta['num_tokens']:,} tokens from {', '.join(meta['sources'])} into {data_dir}")
    world.barrier()
    return TokenData(data_dir)


def _model_config(cfg: TrainConfig, vocab_size: int, state: dict | None) -> GPTConfig:
    """The checkpoint's model when resuming, else the preset sized for the tokenizer."""
    if state is not None:
        return GPTConfig.from_dict(state["model_config"])
    overrides = {"vocab_size": vocab_size, "drop_rate": cfg.dropout}
    if cfg.context_length:
        overrides["context_length"] = cfg.context_length
    return GPTConfig.from_preset(cfg.preset, **overrides)


def _grad_accum(cfg: TrainConfig, context_length: int, processes: int) -> int:
    if cfg.tokens_per_step is None:
        return cfg.grad_accum
    per_micro = cfg.batch_size * context_length * processes
    if cfg.tokens_per_step % per_micro:
        raise ValueError(f"tokens_per_step {cfg.tokens_per_step} is not a multiple of batch_size x "
                         f"context_length x processes = {per_micro}")
    return cfg.tokens_per_step // per_micro


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
                                amp_dtype=self.amp_dtype, scaler=self.scaler)
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
                "tokenizer": self.tokenizer.to_dict(), "data": self.stream.state_dict(),
                **({"scaler": self.scaler.state_dict()} if self.scaler is not None else {})}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
        self.stream.load_state_dict(state["data"])
        self.step = state["step"]

    def save(self) -> None:
        """Write the checkpoint, from the main process (every process holds the same state)."""
        if self.world.main:
            save_checkpoint(self.checkpoint_path, self.state_dict())


def train(cfg: TrainConfig) -> dict:
    """Train, validate and checkpoint as ``cfg`` says; returns a summary of the run.

    The summary holds ``step``, ``loss`` (the last step's training loss), ``val_loss`` (the last
    validation), ``checkpoint`` (its path), ``stopped`` (True when a signal or ``run_steps`` ended
    the run early) and ``sample`` (generated text, or None). It seeds torch's global generator and
    selects ``cfg.backend`` while it runs.
    """
    with kernels.use_backend(cfg.backend), distributed(cfg.device) as (world, device):
        run = _start_run(cfg, world, device)
        summary = _train(run)
        return _finish(run, summary) if world.main else summary


def _start_run(cfg: TrainConfig, world: World, device: torch.device) -> _Run:
    """The run, checked before its first step: the data and tokenizer, the model (from the checkpoint
    when resuming), its optimizer, loss scaler and batch stream."""
    checkpoint_path = Path(cfg.out_dir) / CHECKPOINT_FILE
    if cfg.resume and not checkpoint_path.is_file():
        raise FileNotFoundError(f"cannot resume: no checkpoint at {str(checkpoint_path)!r}")
    if not cfg.resume and not cfg.overwrite and checkpoint_path.is_file():
        raise FileExistsError(f"{str(checkpoint_path)!r} exists: pass --resume to continue that run or "
                              "--overwrite to start afresh (or choose another --out-dir)")
    data = _open_data(cfg, world)
    tokenizer = data.tokenizer(cfg.tiktoken_file)
    prompt = tokenizer.encode(cfg.sample_prompt) if cfg.sample_tokens else []
    state = load_checkpoint(checkpoint_path) if cfg.resume else None
    if state is not None and state["tokenizer"] != tokenizer.to_dict():
        raise ValueError(f"the checkpoint was trained with another tokenizer than {data.dir}'s: "
                         "resume with the data it was trained on")
    config = _model_config(cfg, tokenizer.vocab_size, state)
    T = config.context_length
    grad_accum = _grad_accum(cfg, T, world.size)
    amp_dtype = amp_dtype_for(cfg.dtype, device)

    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    model = GPT(config).to(device)
    optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2))
    stream = BatchStream(data.train, T, order=cfg.order, seed=cfg.seed)
    BatchStream(data.val, T, split="validation")  # fail now, not at the first validation
    run = _Run(cfg, world, device, data, tokenizer, prompt, model, optimizer, grad_scaler(amp_dtype, device),
               stream, grad_accum, amp_dtype)
    if state is not None:
        run.load_state_dict(state)
        if run.step >= cfg.max_steps:
            raise ValueError(f"the checkpoint is at step {run.step}, already at max_steps {cfg.max_steps}: "
                             "raise --max-steps to train further")
    run.runner = torch.compile(model) if cfg.compile else model
    if world.size > 1:
        run.runner = DistributedDataParallel(run.runner, device_ids=[device.index] if device.type == "cuda" else None)
    Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
    if world.main:
        print(f"model: {cfg.preset} ({model.num_parameters():,} parameters, vocabulary {config.vocab_size}, "
              f"context {T}); {run.tokens_per_step:,} tokens per step = {world.size} process(es) x "
              f"{grad_accum} micro-batch(es) x {cfg.batch_size} x {T}; device {device}, "
              f"backend {kernels.get_backend()}" + (f"; resuming at step {run.step}" if run.step else ""))
    return run


def _train(run: _Run) -> dict:
    """The loop: step; log, validate and checkpoint when due; stop at max_steps, after run_steps, or when asked."""
    cfg, world = run.cfg, run.world
    start_step, loss, val_loss, saved_at, stopped = run.step, None, None, None, False
    peak = peak_flops(run.device) if run.amp_dtype == torch.bfloat16 else None
    flops_per_step = model_flops_per_token(run.model.config) * run.tokens_per_step
    meter = Throughput(run.step, run.tokens_per_step, flops_per_step, None if peak is None else peak * world.size)
    log = RunLog(Path(cfg.out_dir), main=world.main, resume_step=run.step if cfg.resume else None,
                 step=run.step, max_steps=cfg.max_steps, progress=cfg.progress)
    with StopRequest() as stop, log:
        while run.step < cfg.max_steps:
            loss_t, norm, lr = run.train_one_step()
            log.advance()
            if run.step % cfg.log_interval == 0 or run.step == cfg.max_steps:
                loss = world.mean(loss_t).item()
                if not math.isfinite(loss):
                    raise FloatingPointError(f"training loss is {loss} at step {run.step}: lower --lr")
                log.train(run.step, loss, lr, None if norm is None else norm.item(), *meter.measure(run.step))
            if run.step % cfg.eval_interval == 0 or run.step == cfg.max_steps:
                with meter.paused():  # keep validation and the checkpoint out of the tokens-per-second figure
                    val_loss = run.validation_loss()
                    log.validation(run.step, val_loss, loss)
                    run.save()
                saved_at = run.step
            ran_out = cfg.run_steps is not None and run.step - start_step >= cfg.run_steps
            if world.any(stop.requested, run.device) or (ran_out and run.step < cfg.max_steps):
                stopped = True
                break
        if saved_at != run.step:
            run.save()
    loss = world.mean(loss_t).item() if run.step > start_step else loss
    return {"step": run.step, "loss": loss, "val_loss": val_loss, "checkpoint": str(run.checkpoint_path),
            "stopped": stopped, "sample": None}


def _finish(run: _Run, summary: dict) -> dict:
    """The main process's end of a run: how to continue a stopped one, the loss curve, the sample."""
    cfg, out = run.cfg, Path(run.cfg.out_dir)
    if summary["stopped"]:
        print(f"stopped at step {summary['step']}; checkpoint {run.checkpoint_path} (continue with --resume)")
    png = plot_losses(out / LOG_FILE, out / PLOT_FILE)
    if png:
        print(f"loss curve: {png}")
    if not summary["stopped"] and cfg.sample_tokens > 0:
        run.model.eval()
        eot = run.tokenizer.eot_token_id
        new = generate(run.model, [run.prompt or [eot or 0]], cfg.sample_tokens, temperature=0.8, top_k=50,
                       seed=cfg.seed, eos_token_id=eot)[0]
        summary["sample"] = run.tokenizer.decode(new)
        print(f"\nsample ({cfg.sample_tokens} tokens after {cfg.sample_prompt!r}):\n"
              f"{cfg.sample_prompt}{summary['sample']}")
    return summary
