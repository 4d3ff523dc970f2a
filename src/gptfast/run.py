"""A training run: its setup and its state (the step it is at) and checkpoints.

:func:`start_run` checks everything before the first step: the options (settled against the
checkpoint when resuming, :mod:`gptfast.resume`), the data and tokenizer, the model (a preset or
``init_from``'s weights, :mod:`gptfast.setup_run`), its optimizer, loss scaler and batch stream.
:class:`Run` steps, validates and writes the checkpoint, which is its :meth:`Run.state_dict`, only
when everything in it is finite.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from . import kernels
from .activation_checkpointing import apply_activation_checkpointing
from .checkpoint import CHECKPOINT_FILE, TRAINING_FIELDS, load_checkpoint, model_config_from, save_checkpoint
from .config import TrainConfig, named
from .data import BatchStream, TokenData
from .distributed import World
from .evaluate import split_loss
from .fsdp import check_fsdp_options, init_gpt2_weights, load_whole, local, sharded_model, whole_model
from .hellaswag import Example, Score, read_examples, score
from .memory import gigabytes
from .model import GPT
from .optim import check_optimizer_state, lr_at, make_optimizer, train_step
from .precision import amp_dtype_for, grad_scaler
from .resume import grad_accum_for, settle
from .runlog import require_tensorboard
from .setup_run import check_memory, initial_model, memory_estimate, open_data, preset_config
from .sharded_checkpoint import (
    SHARDED_DIR,
    is_sharded_checkpoint,
    load_sharded,
    read_sharded_state,
    remove_sharded,
    save_sharded,
    tensors_of,
)
from .tokenizer import Tokenizer


@dataclass
class Run:
    """A run in progress: what it trains and with what, and the step it is at.

    The checkpoint is :meth:`state_dict`; ``runner`` is the model as trained (compiled, wrapped in DDP;
    under ``--parallel fsdp`` the sharded model itself, its checkpoint sharded: :mod:`gptfast.sharded_checkpoint`).
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
    amp_dtype: torch.dtype | None
    runner: torch.nn.Module | None = None
    hellaswag: list[Example] | None = None  # --hellaswag's examples, tokenized
    step: int = 0
    saved_step: int | None = None  # the step the checkpoint holds

    @property
    def sharded(self) -> bool:
        return self.cfg.parallel == "fsdp"

    @property
    def checkpoint_path(self) -> Path:
        return Path(self.cfg.out_dir) / (SHARDED_DIR if self.sharded else CHECKPOINT_FILE)

    @property
    def tokens_per_step(self) -> int:
        return self.cfg.grad_accum * self.world.size * self.cfg.batch_size * self.model.config.context_length

    def train_one_step(self) -> tuple[torch.Tensor, torch.Tensor | None, float]:
        """One optimizer step: (mean loss, gradient norm) on the device, and the learning rate.

        The step's micro-batches are drawn together and dealt out by rank; dropout is re-seeded from
        (seed, step, rank), so a resumed run draws what an uninterrupted one would.
        """
        cfg, world = self.cfg, self.world
        torch.manual_seed(cfg.seed + 1_000_003 * self.step + world.rank)  # dropout's random numbers
        starts = self.stream.next_starts(world.size * self.cfg.grad_accum * cfg.batch_size)
        mine = starts.view(world.size, self.cfg.grad_accum, cfg.batch_size)[world.rank]
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

    def hellaswag_due(self) -> bool:
        """Whether this step scores --hellaswag: every --hellaswag-every steps (else --eval-interval), and the last."""
        every = self.cfg.hellaswag_every or self.cfg.eval_interval
        return self.hellaswag is not None and (self.step % every == 0 or self.step == self.cfg.max_steps)

    def hellaswag_score(self) -> Score:
        """--hellaswag's accuracy, the examples dealt out by rank (the model unwrapped: the rows vary in length)."""
        return score(self.model, self.hellaswag, amp_dtype=self.amp_dtype, ctx=self.world)

    def state_dict(self) -> dict:
        """The checkpoint: everything a resumed run needs, tensors and plain values only."""
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), **self.plain_state()}

    def plain_state(self) -> dict:
        """The checkpoint but the model's and optimizer's tensors: a sharded checkpoint's train_state.pt."""
        return {"step": self.step, "model_config": self.model.config.to_dict(), "train_config": asdict(self.cfg),
                "tokenizer": self.tokenizer.to_dict(), "data": self.stream.state_dict(), "processes": self.world.size,
                "data_meta": self.data.meta,  # what a resumed run checks a moved data folder against
                **({"scaler": self.scaler.state_dict()} if self.scaler is not None else {})}

    def load_state_dict(self, state: dict, source: Path) -> None:
        """Restore the checkpoint ``state`` read from ``source`` (a file or a sharded folder, whatever this
        run's parallelism); a field that does not fit is an error naming it. This run's AdamW
        hyperparameters replace the saved ones (the learning rate is set at every step)."""
        if is_sharded_checkpoint(source):
            load_sharded(source, self.model, self.optimizer, self.world)
        elif self.sharded:  # a whole checkpoint (DDP's) into this run's shards
            whole = GPT(self.model.config)
            optimizer = make_optimizer(whole, self.cfg.lr, self.cfg.weight_decay)
            load_parts(state, [("model", whole), ("optimizer", optimizer)], source)
            load_whole(self.model, self.optimizer, whole, optimizer)
        else:
            load_parts(state, [("model", self.model), ("optimizer", self.optimizer)], source)
        has_scaler = self.scaler is not None and "scaler" in state
        load_parts(state, [("data", self.stream)] + ([("scaler", self.scaler)] if has_scaler else []), source)
        for group in self.optimizer.param_groups:
            group["betas"] = (self.cfg.beta1, self.cfg.beta2)
            if group["weight_decay"]:
                group["weight_decay"] = self.cfg.weight_decay
        self.step = self.saved_step = state["step"]

    def describe(self) -> str:
        """The lines a run starts with: the model, the tokens per step and how they are made, where it
        runs; then the memory estimate per process (GPU)."""
        cfg, world, T = self.cfg, self.world, self.model.config.context_length
        estimate = memory_estimate(cfg, self.model.config, self.device, world.size)
        return (f"model: {cfg.preset or f'from {cfg.init_from}'} ({self.model.num_parameters():,} parameters, "
                f"vocabulary {self.model.config.vocab_size}, context {T}); {self.tokens_per_step:,} tokens per "
                f"step = {world.size} process(es) x {cfg.grad_accum} micro-batch(es) x {cfg.batch_size} x {T}; "
                f"device {self.device}, backend {kernels.get_backend()}"
                + (f"; parameters, gradients and optimizer state sharded over {world.size} process(es) (FSDP)"
                   if self.sharded else "")
                + (f"; resuming at step {self.step}" if cfg.resume else "")
                + f"\nmemory per process (estimate): {estimate.describe()}; total {gigabytes(estimate.total)} "
                f"(activation checkpointing {cfg.activation_checkpointing})")

    def nonfinite(self, val_loss: float | None) -> str | None:
        """What is not finite (NaN or Inf), of the weights, the optimizer state and ``val_loss``; None if all is."""
        if val_loss is not None and not math.isfinite(val_loss):
            return f"the validation loss is {val_loss}"
        weights = [local(p) for p in self.model.parameters()]  # under FSDP, each process checks its shards
        moments = [local(t) for s in self.optimizer.state.values() for t in s.values()
                   if isinstance(t, torch.Tensor) and t.is_floating_point()]
        finite = torch.stack([torch.isfinite(t).all() for t in weights + moments]).tolist()
        weights_finite, all_finite = all(finite[: len(weights)]), all(finite)
        if self.sharded:
            weights_finite, all_finite = (not self.world.any(not ok, self.device)
                                          for ok in (weights_finite, all_finite))
        if not weights_finite:
            return "the weights hold NaN or Inf"
        return None if all_finite else "the optimizer state holds NaN or Inf"

    def diverged(self, problem: str) -> FloatingPointError:
        """The error that stops a diverging run, saying which step ckpt.pt keeps."""
        kept = (f"{self.checkpoint_path} still holds step {self.saved_step}" if self.saved_step is not None
                else "no checkpoint was written")
        return FloatingPointError(f"step {self.step}: {problem}, so the run stops unsaved; {kept}. "
                                  f"The training diverged: lower {named('lr')} and resume")

    def save(self, val_loss: float | None = None) -> None:
        """Write the checkpoint, from the main process (every process holds the same state), unless
        something in it is not finite: then the run stops with an error and ckpt.pt keeps its step."""
        problem = self.nonfinite(val_loss)
        if problem:
            raise self.diverged(problem)
        out_dir = Path(self.cfg.out_dir)
        if self.sharded:
            save_sharded(out_dir, self.step, tensors_of(self.model, self.optimizer), self.plain_state(), self.world,
                         self.device)
        elif self.world.main:
            save_checkpoint(self.checkpoint_path, self.state_dict())
        if self.world.main and self.sharded:  # the other parallelism's checkpoint (resumed from) is older
            (out_dir / CHECKPOINT_FILE).unlink(missing_ok=True)
        elif self.world.main:
            remove_sharded(out_dir)
        self.saved_step = self.step

    def inference_model(self) -> GPT | None:
        """The whole model, for the final sample: gathered onto the main process from the shards under
        FSDP (every process calls it; the others get None)."""
        if not self.sharded:
            return self.model
        return whole_model(self.model, self.world)


def start_run(cfg: TrainConfig, world: World, device: torch.device) -> Run:
    """The run, checked before its first step: the options (against the checkpoint when resuming),
    the data and tokenizer, the model, its optimizer, loss scaler and batch stream."""
    path = _check_out_dir(cfg, Path(cfg.out_dir))
    state = _read_checkpoint(path) if cfg.resume else None
    cfg = settle(cfg, state, path, world)
    data = open_data(cfg, world)
    tokenizer = data.tokenizer(cfg.tiktoken_file)
    prompt = tokenizer.encode(cfg.sample_prompt) if cfg.sample_tokens else []
    if state is not None and state["tokenizer"] != tokenizer.to_dict():
        raise ValueError(f"the checkpoint was trained with another tokenizer than {data.dir}'s: "
                         "resume with the data it was trained on")
    amp_dtype = amp_dtype_for(cfg.dtype, device)
    check_fsdp_options(cfg, amp_dtype)
    model = _model(cfg, state, path, tokenizer, world, device, amp_dtype)
    T = model.config.context_length
    # tokens_per_step is saved as the grad_accum it sets, so that a resumed run takes the same steps.
    cfg = dataclasses.replace(cfg, grad_accum=grad_accum_for(cfg.grad_accum, cfg.tokens_per_step, cfg.batch_size, T,
                                                             world.size))
    optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2))
    stream = BatchStream(data.train, T, order=cfg.order, seed=cfg.seed)
    BatchStream(data.val, T, split="validation")  # fail now, not at the first validation
    autocast_dtype = None if cfg.parallel == "fsdp" else amp_dtype  # FSDP: its mixed-precision policy instead
    run = Run(cfg, world, device, data, tokenizer, prompt, model, optimizer, grad_scaler(amp_dtype, device), stream,
              autocast_dtype, hellaswag=_hellaswag_examples(cfg, tokenizer, T))
    if state is not None:
        run.load_state_dict(state, path)
        if run.step >= cfg.max_steps:
            raise ValueError(f"the checkpoint is at step {run.step}, already at max_steps {cfg.max_steps}: "
                             f"raise {named('max_steps')} to train further")
    run.runner = model
    if cfg.parallel == "ddp":  # (FSDP's blocks were checkpointed and compiled before sharding: sharded_model)
        apply_activation_checkpointing(model, cfg.activation_checkpointing)  # before compile and DDP wrap the blocks
        run.runner = torch.compile(model) if cfg.compile else model
    if cfg.parallel == "ddp" and world.size > 1:
        run.runner = DistributedDataParallel(run.runner, device_ids=[device.index] if device.type == "cuda" else None,
                                             process_group=world.group)
    Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
    if world.main:
        print(run.describe())
    return run


def _hellaswag_examples(cfg: TrainConfig, tokenizer: Tokenizer, context_length: int) -> list[Example] | None:
    """--hellaswag's examples, read and tokenized before the first step (a bad line fails now)."""
    if cfg.hellaswag is None:
        if cfg.hellaswag_every is not None:
            raise ValueError(f"{named('hellaswag_every', cfg.hellaswag_every)} needs {named('hellaswag')}: "
                             "name the HellaSwag file to score")
        return None
    return read_examples(cfg.hellaswag, tokenizer, context_length)


def _model(cfg: TrainConfig, state: dict | None, path: Path, tokenizer: Tokenizer, world: World,
           device: torch.device, amp_dtype: torch.dtype | None) -> GPT:
    """The model on ``device``: whole (DDP), or built on the meta device and sharded (FSDP); a new run's
    weights initialised from the seed (the same at every world size, sharded or not) or ``init_from``'s,
    a resumed run's left for the checkpoint."""
    source = initial_model(cfg, tokenizer) if state is None and cfg.init_from else None
    if state is not None:
        config = model_config_from(state["model_config"], f"{path}: field 'model_config'")
    else:
        config = source.config if source is not None else preset_config(cfg, tokenizer)
    config.deterministic_attention = cfg.deterministic
    # before anything of the run's size is built (a source model is already on the CPU)
    check_memory(cfg, config, device, world.size, 0 if source is None else source.num_parameters() * 4)
    if cfg.parallel == "fsdp":
        model = sharded_model(config, world, device, amp_dtype, cfg.reshard_after_forward, cfg.compile,
                              cfg.activation_checkpointing)
    else:
        model = source if source is not None else GPT.unfilled(config)  # set below, or by the checkpoint
    if source is not None and cfg.parallel == "fsdp":
        load_whole(model, None, source, None)
    elif source is None and state is None:
        init_gpt2_weights(model, cfg.seed)
    return model.to(device)


def load_parts(state: dict, parts: list[tuple[str, object]], source: Path) -> None:
    """Load each (field, part) of a checkpoint's ``state`` (read from ``source``) into its part, a field
    that does not fit one error naming it."""
    check = dict(parts)
    if "optimizer" in check:
        check_optimizer_state(check["model"], check["optimizer"], state["optimizer"], source)
    for field, part in parts:
        try:
            part.load_state_dict(state[field])
        except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as error:
            details = " ".join(str(error).split())[:300]
            raise ValueError(f"{source} is damaged: field {field!r} does not fit this run "
                             f"({type(error).__name__}: {details})") from None


def check_out_dir_is_a_folder(out_dir: Path) -> None:
    """``out_dir`` and the first of its parents that exists are folders (or links to folders), checked
    before anything is written: a file or a symbolic link to nothing in the way is one clear error."""
    for path in (out_dir, *out_dir.parents):
        where = named("out_dir", str(out_dir)) + ("" if path == out_dir else f": {path}")
        if path.is_symlink() and not path.exists():
            raise FileNotFoundError(f"{where} is a symbolic link to {os.readlink(path)}, which does not exist: "
                                    f"create that folder or choose another {named('out_dir')}")
        if path.exists():
            if not path.is_dir():
                raise NotADirectoryError(f"{where} is a file, not a folder: choose another {named('out_dir')}")
            return


def latest_checkpoint(out_dir: Path) -> Path | None:
    """The checkpoint of ``out_dir``'s run: ``ckpt.pt`` or the sharded ``ckpt``, whichever was written last
    when a kill left both (a run resumed under the other parallelism deletes the older after its save)."""
    found = [path for path in (out_dir / CHECKPOINT_FILE, out_dir / SHARDED_DIR)
             if path.is_file() or is_sharded_checkpoint(path)]
    return max(found, key=lambda path: path.stat().st_mtime, default=None)


def _read_checkpoint(path: Path) -> dict:
    if is_sharded_checkpoint(path):
        return read_sharded_state(path, require=TRAINING_FIELDS)
    return load_checkpoint(path, require=TRAINING_FIELDS)


def _check_out_dir(cfg: TrainConfig, out_dir: Path) -> Path:
    """The checkpoint to resume, or none to overwrite unasked; the tensorboard package if asked for.
    Returns the checkpoint's path (where this run's would go when there is none)."""
    path = latest_checkpoint(out_dir)
    if cfg.resume and path is None:
        raise FileNotFoundError(f"cannot resume: no checkpoint at {str(out_dir / CHECKPOINT_FILE)!r} "
                                f"(nor a sharded one at {str(out_dir / SHARDED_DIR)!r})")
    if not cfg.resume and not cfg.overwrite and path is not None:
        raise FileExistsError(f"{str(path)!r} exists: pass {named('resume', True)} to continue that run or "
                              f"{named('overwrite', True)} to start afresh (or choose another {named('out_dir')})")
    if cfg.tensorboard:
        require_tensorboard()
    return path or out_dir / (SHARDED_DIR if cfg.parallel == "fsdp" else CHECKPOINT_FILE)
