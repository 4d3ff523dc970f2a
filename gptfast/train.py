"""Training: ``train(TrainConfig(...))``, which ``gptfast train`` calls, on one device or many.

One optimizer step reads ``grad_accum`` micro-batches on each of ``world_size`` processes; the
micro-batches of a step are drawn together and dealt out by rank, so two processes with
accumulation 1 see exactly the batches one process with accumulation 2 sees. Under ``torchrun``
(``WORLD_SIZE`` > 1) the model is wrapped in DistributedDataParallel, NCCL on GPUs, gloo on CPUs.

Stopping and resuming: the first Ctrl-C (or SIGTERM) finishes the current step, writes the
checkpoint and returns; a second one interrupts at once. ``resume=True`` continues from the
checkpoint exactly: the data stream's position and generator are saved, and dropout's random
numbers are re-seeded at every step from (seed, step, rank), so no other RNG state is needed.

:func:`make_optimizer`, :func:`train_step` and :func:`model_flops_per_token` are the pieces the
benchmarks reuse, so they measure the code that trains.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from . import kernels

from .checkpoint import CHECKPOINT_FILE, load_checkpoint, save_checkpoint
from .data import BatchStream, TokenData, is_prepared, prepare
from .model import GPT, PRESETS, GPTConfig

LOG_FILE = "log.jsonl"
PLOT_FILE = "loss.png"

# Dense bf16 tensor-core peaks (FLOP/s) for model FLOPs utilisation; the first name found in the
# device name wins, so the more specific names come first.
# --dtype: the autocast dtype of each choice ("auto" picks one for the device, see amp_dtype_for).
AMP_DTYPES = {"auto": None, "bfloat16": torch.bfloat16, "float16": torch.float16, "float32": None}
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
    backend: str = "auto"
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


def amp_dtype_for(dtype: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for a ``--dtype`` choice on ``device`` (None: float32, no autocast).

    "auto" is bfloat16 on GPUs with bf16 arithmetic (compute capability 8.0 and up), float16 on
    older ones (the trainer then scales the loss), and float32 on CPUs.
    """
    if dtype != "auto":
        return AMP_DTYPES[dtype]
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.get_device_capability(device) >= (8, 0) else torch.float16


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
        autocast = torch.autocast(device_type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()
        with no_sync:
            with autocast:
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


@dataclass
class _Dist:
    """This process's place among the training processes, and the collectives the loop needs."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            value = value.clone()
            dist.all_reduce(value)
            value /= self.world_size
        return value

    def any(self, flag: bool, device: torch.device) -> bool:
        if self.world_size == 1:
            return flag
        t = torch.tensor(float(flag), device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()


def _init_distributed(cfg: TrainConfig) -> tuple[_Dist, torch.device]:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    ctx = _Dist(int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0")), world_size)
    if cfg.device == "auto":
        device = torch.device(f"cuda:{ctx.local_rank}" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(cfg.device)
    if device.type == "cuda":
        if device.index is None:  # plain "cuda": the current GPU, named by index for set_device and DDP
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return ctx, device


class _StopRequest:
    """Turns the first SIGINT/SIGTERM into a flag the loop checks after each step."""

    def __init__(self):
        self.requested = False
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        if self.requested:  # a second signal: stop now
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> "_StopRequest":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _resolve_data(cfg: TrainConfig, ctx: _Dist) -> TokenData:
    """The prepared data: ``cfg.data`` itself, or text prepared into ``out_dir/data`` (once per run)."""
    if cfg.data and len(cfg.data) == 1 and is_prepared(cfg.data[0]):
        return TokenData(cfg.data[0])
    data_dir = Path(cfg.out_dir) / "data"
    if ctx.main and not (cfg.resume and is_prepared(data_dir)):
        meta = prepare(cfg.data, data_dir, tokenizer=cfg.tokenizer, tiktoken_file=cfg.tiktoken_file)
        print(f"prepared {meta['num_tokens']:,} tokens from {', '.join(meta['sources'])} into {data_dir}")
    ctx.barrier()
    return TokenData(data_dir)


def _model_config(cfg: TrainConfig, vocab_size: int, state: dict | None) -> GPTConfig:
    """The checkpoint's model when resuming, else the preset sized for the tokenizer."""
    if state is not None:
        return GPTConfig.from_dict(state["model_config"])
    overrides = {"vocab_size": vocab_size, "drop_rate": cfg.dropout}
    if cfg.context_length:
        overrides["context_length"] = cfg.context_length
    return GPTConfig.from_preset(cfg.preset, **overrides)


def _grad_accum(cfg: TrainConfig, context_length: int, world_size: int) -> int:
    if cfg.tokens_per_step is None:
        return cfg.grad_accum
    per_micro = cfg.batch_size * context_length * world_size
    if cfg.tokens_per_step % per_micro:
        raise ValueError(f"tokens_per_step {cfg.tokens_per_step} is not a multiple of batch_size x "
                         f"context_length x processes = {per_micro}")
    return cfg.tokens_per_step // per_micro


def _open_log(path: Path, resume_step: int | None):
    """log.jsonl for appending: emptied for a new run; on resume, cut back to the checkpoint's step."""
    if resume_step is not None and path.is_file():
        kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= resume_step]
        path.write_text("".join(line + "\n" for line in kept))
        return open(path, "a")
    return open(path, "w")


def _plot(log_path: Path, png_path: Path) -> Path | None:
    """A loss-curve PNG from the JSON-lines log (None when matplotlib is missing)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    records = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    for points, label in ((train, "train"), (val, "validation")):
        if points:
            ax.plot(*zip(*points), label=label, marker="o" if label == "validation" else None)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return png_path


@torch.no_grad()
def split_loss(model: torch.nn.Module, tokens: np.ndarray, context_length: int, batch_size: int = 16,
               max_windows: int | None = None, amp_dtype: torch.dtype | None = None,
               ctx: _Dist | None = None) -> tuple[float, int]:
    """Mean next-token loss of ``model`` over ``tokens`` cut into consecutive windows of
    ``context_length`` (every whole window, or the first ``max_windows``), and how many tokens that is.
    Under several processes (``ctx``) the batches are dealt out by rank and the sums combined.
    """
    if batch_size < 1 or (max_windows is not None and max_windows < 1):
        raise ValueError(f"batch_size ({batch_size}) and max_windows ({max_windows}) must be positive")
    stream = BatchStream(tokens, context_length, order="sequential", split="evaluated")
    windows = (len(tokens) - 1) // context_length
    windows = windows if max_windows is None else min(windows, max_windows)
    ctx = ctx or _Dist()
    starts = stream.next_starts(windows).split(batch_size)
    device = next(model.parameters()).device
    total = torch.zeros((), dtype=torch.float64, device=device)
    was_training = model.training
    model.eval()
    try:
        for batch_starts in starts[ctx.rank::ctx.world_size]:
            x, y = stream.batch(batch_starts, device)
            with torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext():
                _, loss = model(x, y)
            total += loss.double() * y.numel()
    finally:
        model.train(was_training)
    return (ctx.mean(total) * ctx.world_size / (windows * context_length)).item(), windows * context_length


def train(cfg: TrainConfig) -> dict:
    """Train, validate and checkpoint as ``cfg`` says; returns a summary of the run.

    The summary holds ``step``, ``loss`` (the last step's training loss), ``val_loss`` (the last
    validation), ``checkpoint`` (its path), ``stopped`` (True when a signal or ``run_steps`` ended
    the run early) and ``sample`` (generated text, or None). It seeds torch's global generator and
    selects ``cfg.backend`` while it runs.
    """
    with kernels.use_backend(cfg.backend):
        ctx, device = _init_distributed(cfg)
        try:
            return _train(cfg, ctx, device)
        finally:
            if ctx.world_size > 1 and dist.is_initialized():
                dist.destroy_process_group()


def _train(cfg: TrainConfig, ctx: _Dist, device: torch.device) -> dict:
    out = Path(cfg.out_dir)
    ckpt_path = out / CHECKPOINT_FILE
    if cfg.resume and not ckpt_path.is_file():
        raise FileNotFoundError(f"cannot resume: no checkpoint at {str(ckpt_path)!r}")
    if not cfg.resume and not cfg.overwrite and ckpt_path.is_file():
        raise FileExistsError(f"{str(ckpt_path)!r} exists: pass --resume to continue that run or "
                              "--overwrite to start afresh (or choose another --out-dir)")
    data = _resolve_data(cfg, ctx)
    tokenizer = data.tokenizer(cfg.tiktoken_file)
    prompt = tokenizer.encode(cfg.sample_prompt) if cfg.sample_tokens else []  # a bad prompt fails now
    state = load_checkpoint(ckpt_path) if cfg.resume else None
    if state is not None and state["tokenizer"] != tokenizer.to_dict():
        raise ValueError(f"the checkpoint was trained with another tokenizer than {data.dir}'s: "
                         "resume with the data it was trained on")
    config = _model_config(cfg, tokenizer.vocab_size, state)
    T = config.context_length
    grad_accum = _grad_accum(cfg, T, ctx.world_size)
    amp_dtype = amp_dtype_for(cfg.dtype, device)

    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    model = GPT(config).to(device)
    optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2))
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None
    stream = BatchStream(data.train, T, order=cfg.order, seed=cfg.seed)
    BatchStream(data.val, T, split="validation")  # fail now, not at the first validation
    step = 0
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if scaler is not None and "scaler" in state:
            scaler.load_state_dict(state["scaler"])
        stream.load_state_dict(state["data"])
        step = state["step"]
        if step >= cfg.max_steps:
            raise ValueError(f"the checkpoint is at step {step}, already at max_steps {cfg.max_steps}: "
                             "raise --max-steps to train further")
    runner: torch.nn.Module = torch.compile(model) if cfg.compile else model
    if ctx.world_size > 1:
        runner = DistributedDataParallel(runner, device_ids=[device.index] if device.type == "cuda" else None)

    out.mkdir(parents=True, exist_ok=True)
    log = _open_log(out / LOG_FILE, resume_step=step if cfg.resume else None) if ctx.main else None
    tokens_per_step = grad_accum * ctx.world_size * cfg.batch_size * T
    flops_per_step = model_flops_per_token(config, T) * tokens_per_step
    peak = peak_flops(device) if amp_dtype == torch.bfloat16 else None
    if ctx.main:
        print(f"model: {cfg.preset} ({model.num_parameters():,} parameters, vocabulary {config.vocab_size}, "
              f"context {T}); {tokens_per_step:,} tokens per step = {ctx.world_size} process(es) x "
              f"{grad_accum} micro-batch(es) x {cfg.batch_size} x {T}; device {device}, "
              f"backend {kernels.get_backend()}" + (f"; resuming at step {step}" if step else ""))

    def record(entry: dict) -> None:  # to log.jsonl
        if log is not None:
            log.write(json.dumps(entry) + "\n")
            log.flush()

    def checkpoint() -> None:
        if ctx.main:
            save_checkpoint(ckpt_path, {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                "model_config": config.to_dict(), "train_config": asdict(cfg),
                "tokenizer": tokenizer.to_dict(), "data": stream.state_dict(),
                **({"scaler": scaler.state_dict()} if scaler is not None else {})})

    from tqdm import tqdm

    bar = tqdm(total=cfg.max_steps, initial=step, desc="training", dynamic_ncols=True,
               disable=not (ctx.main and cfg.progress))
    start_step, loss, val_loss, saved_at, speed = step, None, None, None, "speed not measured yet"
    stopped = False
    t0, steps_since_log = time.perf_counter(), 0
    with _StopRequest() as stop, bar, log if log is not None else contextlib.nullcontext():
        while step < cfg.max_steps:
            torch.manual_seed(cfg.seed + 1_000_003 * step + ctx.rank)  # dropout's random numbers
            starts = stream.next_starts(ctx.world_size * grad_accum * cfg.batch_size)
            mine = starts.view(ctx.world_size, grad_accum, cfg.batch_size)[ctx.rank]
            batches = [stream.batch(s, device) for s in mine]
            lr = lr_at(step, cfg)
            loss_t, norm = train_step(runner, optimizer, batches, lr=lr, grad_clip=cfg.grad_clip,
                                      amp_dtype=amp_dtype, scaler=scaler)
            step += 1
            steps_since_log += 1
            bar.update(1)
            if step % cfg.log_interval == 0 or step == cfg.max_steps:
                loss = ctx.mean(loss_t).item()
                if not math.isfinite(loss):
                    raise FloatingPointError(f"training loss is {loss} at step {step}: lower --lr")
                elapsed = time.perf_counter() - t0
                tok_s = steps_since_log * tokens_per_step / elapsed
                grad_norm = None if norm is None else norm.item()  # inf on a step float16 overflow skipped
                entry = {"step": step, "loss": round(loss, 6), "lr": lr, "tokens_per_sec": round(tok_s, 1),
                         "grad_norm": round(grad_norm, 4) if grad_norm is not None and math.isfinite(grad_norm)
                         else None}
                if peak:
                    entry["mfu"] = round(steps_since_log * flops_per_step / elapsed / (peak * ctx.world_size), 4)
                record(entry)
                speed = f"{tok_s:,.0f} tokens/s" + (f", MFU {entry['mfu']:.1%}" if "mfu" in entry else "")
                bar.set_postfix_str(f"loss {loss:.4f}, lr {lr:.2e}, {speed}")
                t0, steps_since_log = time.perf_counter(), 0
            if step % cfg.eval_interval == 0 or step == cfg.max_steps:
                val_loss, _ = split_loss(runner, data.val, T, cfg.batch_size, cfg.eval_batches * cfg.batch_size,
                                         amp_dtype, ctx)
                record({"step": step, "val_loss": round(val_loss, 6)})
                if ctx.main:
                    bar.write(f"step {step}: train loss {loss if loss is not None else float('nan'):.4f}, "
                              f"val loss {val_loss:.4f} ({speed})")
                checkpoint()
                saved_at = step
                if steps_since_log == 0:
                    t0 = time.perf_counter()  # keep validation out of the next tokens-per-second figure
            ran_out = cfg.run_steps is not None and step - start_step >= cfg.run_steps
            if ctx.any(stop.requested, device) or (ran_out and step < cfg.max_steps):
                stopped = True
                break
        if saved_at != step:
            checkpoint()
    loss = ctx.mean(loss_t).item() if step > start_step else loss
    summary = {"step": step, "loss": loss, "val_loss": val_loss, "checkpoint": str(ckpt_path),
               "stopped": stopped, "sample": None}
    if ctx.main:
        if stopped:
            print(f"stopped at step {step}; checkpoint {ckpt_path} (continue with --resume)")
        png = _plot(out / LOG_FILE, out / PLOT_FILE)
        if png:
            print(f"loss curve: {png}")
        if not stopped and cfg.sample_tokens > 0:
            summary["sample"] = _sample(model, tokenizer, prompt, cfg)
            print(f"\nsample ({cfg.sample_tokens} tokens after {cfg.sample_prompt!r}):\n"
                  f"{cfg.sample_prompt}{summary['sample']}")
    return summary


def _sample(model: GPT, tokenizer, prompt: list[int], cfg: TrainConfig) -> str:
    from .generation import generate

    model.eval()
    new = generate(model, [prompt or [tokenizer.eot_token_id or 0]], cfg.sample_tokens, temperature=0.8, top_k=50, seed=cfg.seed,
                   eos_token_id=tokenizer.eot_token_id)[0]
    return tokenizer.decode(new)
