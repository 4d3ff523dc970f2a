"""Training: ``train(TrainConfig(...))``, which ``gptfast train`` calls, on one device or many.

One optimizer step reads ``grad_accum`` micro-batches on each of ``world_size`` processes; the
micro-batches of a step are drawn together and dealt out by rank, so two processes with
accumulation 1 see exactly the batches one process with accumulation 2 sees. Under ``torchrun``
(``WORLD_SIZE`` > 1) the model is wrapped in DistributedDataParallel, NCCL on GPUs, gloo on CPUs;
with ``parallel="fsdp"`` it is sharded instead (:mod:`gptfast.fsdp`), its checkpoint too
(:mod:`gptfast.sharded_checkpoint`).

Stopping and resuming: the first Ctrl-C (or SIGTERM) finishes the current step, writes the
checkpoint and returns; a second one interrupts at once. ``resume=True`` continues from the
checkpoint exactly: the data stream's position and generator are saved, and dropout's random
numbers are re-seeded at every step from (seed, step, rank), so no other RNG state is needed.
Options left out take the checkpoint's values; of those given, the ones that fix what the run
computes (:data:`FIXED_ON_RESUME`) may not contradict it, and the others
(:data:`CHANGEABLE_ON_RESUME`) are applied and printed.

What a run never loses: a checkpoint is written only when the weights, the optimizer state and the
validation loss are finite (a diverging run stops with an error naming the step, the previous
checkpoint kept); one run at a time holds ``out_dir`` (an advisory lock a dead process releases).

This module holds the loop. The options are declared in :mod:`gptfast.config` and settled against
the checkpoint in :mod:`gptfast.resume`; the run's setup, state and checkpoints are in
:mod:`gptfast.run`, its data and initial model in :mod:`gptfast.setup_run`, the optimizer and its
step in :mod:`gptfast.optim` (what the benchmarks time), FLOPs and MFU in :mod:`gptfast.metrics`.
Elsewhere, so that ``eval``, ``generate`` and the benchmarks import them without importing training:
the validation loss (:mod:`gptfast.evaluate`), autocast and loss scaling (:mod:`gptfast.precision`),
the processes (:mod:`gptfast.distributed`), log.jsonl, progress and the loss plot
(:mod:`gptfast.runlog`), Ctrl-C (:mod:`gptfast.interrupt`), the checkpoint file and out_dir's lock
(:mod:`gptfast.checkpoint`), files written whole or not at all (:mod:`gptfast.durable`).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch

from . import kernels
from .checkpoint import out_dir_lock
from .config import CHANGEABLE_ON_RESUME, DEFAULTS, FIXED_ON_RESUME, TrainConfig, cli_options, named
from .distributed import distributed
from .evaluate import split_loss
from .generation import generate
from .interrupt import StopRequest
from .metrics import PEAK_BF16_FLOPS, model_flops_per_token, peak_flops
from .model import GPT, GPTConfig
from .optim import lr_at, make_optimizer, train_step
from .outputs import LOG_FILE, PLOT_FILE
from .precision import AMP_DTYPES, amp_dtype_for
from .run import Run, check_out_dir_is_a_folder, start_run
from .runlog import RunLog, Throughput, plot_losses

# Importable from here before training was split into modules: kept so.
__all__ = ["TrainConfig", "train", "DEFAULTS", "FIXED_ON_RESUME", "CHANGEABLE_ON_RESUME", "cli_options",
           "PEAK_BF16_FLOPS", "model_flops_per_token", "peak_flops", "make_optimizer", "lr_at", "train_step",
           "AMP_DTYPES", "amp_dtype_for", "split_loss", "LOG_FILE", "PLOT_FILE", "GPT", "GPTConfig"]


def train(cfg: TrainConfig) -> dict:
    """Train, validate and checkpoint as ``cfg`` says; returns a summary of the run.

    The summary holds ``step``, ``loss`` (the last step's training loss), ``val_loss`` (the last
    validation), ``checkpoint`` (its path), ``stopped`` (True when a signal or ``run_steps`` ended
    the run early), ``signal`` (the number of the signal that stopped it, or None) and ``sample``
    (generated text, or None). It seeds torch's global generator and selects ``cfg.backend`` while it runs.
    """
    out_dir = Path(cfg.out_dir)
    check_out_dir_is_a_folder(out_dir)
    processes = distributed(cfg.device, cfg.ddp_timeout, named("device"), group_of_one=cfg.parallel == "fsdp")
    with kernels.use_backend(cfg.backend), processes as (world, device), out_dir_lock(out_dir, world.main):
        run = start_run(cfg, world, device)
        try:
            summary = _train(run)
            sampled = run.inference_model() if not summary["stopped"] and cfg.sample_tokens > 0 else None
            return _finish(run, summary, sampled) if world.main else summary
        finally:
            # DDP's reducer lets go of the process group first: freed last through the reducer, the gloo
            # group's destructor joins its worker threads holding the GIL, which a worker may be waiting
            # for (a hang seen at the end of CPU runs under load); freed through the group, it does not.
            run.runner = None


def _train(run: Run) -> dict:
    """The loop: step; log, validate and checkpoint when due; stop at max_steps, after run_steps, or when asked."""
    cfg, world = run.cfg, run.world
    start_step, loss, val_loss, stopped = run.step, None, None, False
    peak = peak_flops(run.device) if amp_dtype_for(cfg.dtype, run.device) == torch.bfloat16 else None
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
            if run.hellaswag_due():
                with meter.paused():
                    log.hellaswag(run.step, run.hellaswag_score())
            ran_out = cfg.run_steps is not None and run.step - start_step >= cfg.run_steps
            if world.any(stop.requested, run.device) or (ran_out and run.step < cfg.max_steps):
                stopped = True
                break
        if run.saved_step != run.step:
            run.save()
    loss = world.mean(loss_t).item() if run.step > start_step else loss
    return {"step": run.step, "loss": loss, "val_loss": val_loss, "checkpoint": str(run.checkpoint_path),
            "stopped": stopped, "signal": stop.signum, "sample": None}


def _plot(out: Path) -> None:
    """loss.png, a nicety: when it cannot be written (no matplotlib, a full disk) the run goes on with a warning."""
    try:
        png = plot_losses(out / LOG_FILE, out / PLOT_FILE)
    except (OSError, ValueError) as error:
        print(f"warning: no loss plot: {error}; the checkpoint and {out / LOG_FILE} are complete", file=sys.stderr)
        return
    if png:
        print(f"loss curve: {png}")
    else:
        print(f"no loss plot: matplotlib is not installed (pip install matplotlib); the losses are in {out / LOG_FILE}")


def _finish(run: Run, summary: dict, sampled: GPT | None) -> dict:
    """The main process's end of a run: how to continue a stopped one, the loss curve, the sample of
    ``sampled`` (the trained model, whole)."""
    cfg, out = run.cfg, Path(run.cfg.out_dir)
    if summary["stopped"]:
        print(f"stopped at step {summary['step']}; checkpoint {run.checkpoint_path} "
              f"(continue with {named('resume', True)})")
    _plot(out)
    if sampled is not None:
        sampled.eval()
        eot = run.tokenizer.eot_token_id
        new = generate(sampled, [run.prompt or [eot or 0]], cfg.sample_tokens, temperature=0.8, top_k=50,
                       seed=cfg.seed, eos_token_id=eot)[0]
        summary["sample"] = run.tokenizer.decode(new)
        print(f"\nsample ({cfg.sample_tokens} tokens after {cfg.sample_prompt!r}):\n"
              f"{cfg.sample_prompt}{summary['sample']}")
    return summary
