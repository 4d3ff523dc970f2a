"""What a run's options become before its first step (:func:`settle`).

A new run keeps its options (each left out is its declared default since construction) and takes
its tokenizer from ``init_from``'s model. A resumed run takes each option left out (not
:meth:`~gptfast.config.TrainConfig.is_given`) from the checkpoint, so a plain
``--resume`` continues the run as it was; of the options given, a FIXED one (what the run
computes) must agree with the checkpoint, every conflict listed in one error, and a CHANGEABLE one
(the schedule, optimizer, logging) replaces the checkpoint's, each change printed. Only options
given change a resumed run. The policies are declared on :class:`~gptfast.config.TrainConfig`'s fields.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from .checkpoint import CHECKPOINT_FILE, INFERENCE_FIELDS, checkpoint_path, load_checkpoint
from .config import CHANGEABLE_ON_RESUME, DEFAULTS, FIXED_ON_RESUME, INIT_FROM_DECIDES, OPTIONS, TrainConfig, named
from .data import is_prepared, read_meta
from .distributed import World
from .options import normalised, problem_with
from .outputs import SHARDED_CHECKPOINT_DIR, SHARDED_MARKER

# What a resumed run reads of the checkpoint's train_config: the options it keeps, and the
# tokens_per_step an older version saved apart from the accumulation it set.
READ_ON_RESUME = (*FIXED_ON_RESUME, *CHANGEABLE_ON_RESUME, "tokens_per_step")


def settle(cfg: TrainConfig, state: dict | None, path: Path, world: World) -> TrainConfig:
    """``cfg`` with every option left out decided: from the checkpoint ``state`` (read from ``path``)
    when resuming, else from the defaults; an option that contradicts the checkpoint is an error."""
    return _settle_new(cfg) if state is None else _settle_resumed(cfg, state, path, world)


def _settle_new(cfg: TrainConfig) -> TrainConfig:
    if cfg.init_from and cfg.preset:
        raise ValueError(f"{named('preset', cfg.preset)} and {named('init_from', cfg.init_from)} contradict "
                         "each other: the model is init_from's")
    hugging_face = cfg.init_from and not is_gptfast_checkpoint(cfg.init_from)
    if hugging_face and cfg.tokenizer not in (None, "gpt2"):
        require_gpt2_tokens(cfg, cfg.tokenizer)  # before preparing any text
    tokenizer = cfg.tokenizer
    if cfg.init_from and tokenizer is None:  # text is tokenized as init_from's model reads it
        tokenizer = "gpt2" if hugging_face else \
            load_checkpoint(checkpoint_path(cfg.init_from), require=INFERENCE_FIELDS)["tokenizer"].get("kind")
    return dataclasses.replace(cfg, data=absolute(cfg.data), tokenizer=tokenizer)


def _settle_resumed(cfg: TrainConfig, state: dict, path: Path, world: World) -> TrainConfig:
    saved = saved_options(state, path)
    values, conflicts, changes = {}, [], []
    for name in (n for n in FIXED_ON_RESUME + CHANGEABLE_ON_RESUME if n != "grad_accum"):  # grad_accum: below
        mine = absolute(cfg.data) if name == "data" else getattr(cfg, name)
        if not cfg.is_given(name):
            values[name] = saved.get(name)
        elif mine != saved.get(name) and name in FIXED_ON_RESUME:
            why = moved_data_problem(mine, state, path) if name == "data" else ""
            if why is None:  # the checkpoint's data folder, moved: a change
                values[name] = mine
                changes.append(f"{name} {saved.get(name)!r} -> {mine!r}")
            else:
                conflicts.append(f"{named(name, mine)} (the checkpoint's: {saved.get(name)!r}{why})")
        else:
            values[name] = mine
            if mine != saved.get(name):
                changes.append(f"{name} {saved.get(name)!r} -> {mine!r}")
    # grad_accum is compared as micro-batches per step over all processes, which may now be more or fewer.
    # A checkpoint of an older version holds tokens_per_step with grad_accum 1: the accumulation it set is derived.
    processes = state.get("processes", world.size)
    if processes < 1:
        raise ValueError(f"{path} is damaged: field 'processes' must be positive, got {processes}")
    theirs = grad_accum_for(saved["grad_accum"], saved.get("tokens_per_step"), saved["batch_size"],
                            saved["context_length"], processes)
    micro_batches = theirs * processes  # per step over all processes
    if cfg.tokens_per_step is not None or cfg.is_given("grad_accum"):
        mine = grad_accum_for(cfg.grad_accum, cfg.tokens_per_step, saved["batch_size"], saved["context_length"],
                              world.size)
        if mine * world.size != micro_batches:
            conflicts.append(f"{named('grad_accum', mine)} x {world.size} process(es) (the checkpoint's: "
                             f"{theirs} x {processes})")
    if conflicts:
        raise ValueError(f"cannot resume {path}: these options contradict the checkpoint: {'; '.join(conflicts)}. "
                         f"Leave them out to use the checkpoint's, or start afresh with {named('overwrite', True)}")
    if micro_batches % world.size:
        raise ValueError(f"cannot resume {path} on {world.size} process(es): its steps are {micro_batches} "
                         "micro-batches, which they cannot share evenly")
    if changes and world.main:
        print(f"resuming with changed options: {', '.join(changes)}")
    return dataclasses.replace(cfg, **values, grad_accum=micro_batches // world.size)


def saved_options(state: dict, path: Path) -> dict:
    """The options the checkpoint ``state`` (read from ``path``) gives a resumed run, each checked
    against its declaration (a bad one is an error naming the file and field); an older checkpoint
    lacks some: their defaults. The tokenizer and context length are the model's."""
    config = state["train_config"]
    found = {name: (f"train_config field {name!r}", config[name]) for name in READ_ON_RESUME if name in config}
    found["tokenizer"] = ("tokenizer field 'kind'", state["tokenizer"].get("kind", config.get("tokenizer")))
    found["context_length"] = ("model_config field 'context_length'", state["model_config"].get("context_length"))
    options = {}
    for name, (field, value) in found.items():
        unset = value is None and (OPTIONS[name].default is None or
                                   (name in INIT_FROM_DECIDES and bool(config.get("init_from"))))
        try:
            options[name] = None if unset else normalised(OPTIONS[name], value)  # an older "bf16": bfloat16
        except ValueError as error:
            raise ValueError(f"{path} is damaged: {field} {error}") from None
        problem = None if unset else problem_with(OPTIONS[name], options[name])
        if problem:
            raise ValueError(f"{path} is damaged: {field} {problem}, got {value!r}")
    return {**DEFAULTS, **options, "data": absolute(options.get("data"))}


def moved_data_problem(data: list[str] | None, state: dict, path: Path) -> str | None:
    """None when ``data``, given on resume, is the checkpoint's prepared data folder moved: a folder
    with the meta.json the checkpoint records (its tokenizer, dtype and token counts, so tokens.bin's
    size; an older checkpoint records none: the old folder's, if still there). Else why not, to
    follow the conflict (empty when ``data`` is no prepared folder)."""
    if not data or len(data) != 1 or not is_prepared(data[0]):
        return ""
    recorded = state.get("data_meta")  # written since issue 30
    if recorded is not None and not isinstance(recorded, dict):
        raise ValueError(f"{path} is damaged: field 'data_meta' is {type(recorded).__name__}, expected dict")
    if recorded is None:
        old = state["train_config"].get("data") or []
        if len(old) != 1 or not is_prepared(old[0]):
            return (f": {path} records no meta.json of its data (an older version wrote it), so {data[0]} "
                    "cannot be checked to hold the same; move the data back")
        recorded = read_meta(Path(old[0]))
    mine = read_meta(Path(data[0]))
    differ = sorted(key for key in set(mine) | set(recorded) if mine.get(key) != recorded.get(key))
    return f": other data, {data[0]}'s meta.json differs in {', '.join(differ)}" if differ else None


def grad_accum_for(grad_accum: int, tokens_per_step: int | None, batch_size: int, context_length: int,
                   processes: int) -> int:
    """A run's micro-batches per step and process: ``grad_accum``, unless ``tokens_per_step``
    (``--tokens-per-step``) sets it, for a model of ``context_length`` on ``processes`` processes."""
    if tokens_per_step is None:
        return grad_accum
    per_micro = batch_size * context_length * processes
    if tokens_per_step % per_micro:
        raise ValueError(f"tokens_per_step {tokens_per_step} is not a multiple of batch_size x "
                         f"context_length x processes = {per_micro}")
    return tokens_per_step // per_micro


def require_gpt2_tokens(cfg: TrainConfig, kind: str) -> None:
    """GPT-2's weights (a Hugging Face ``init_from``) read GPT-2 BPE tokens only."""
    if kind != "gpt2":
        raise ValueError(f"{named('init_from', cfg.init_from)} is GPT-2, which reads GPT-2 BPE tokens, but the data "
                         f"is tokenized {kind}: prepare it with {named('tokenizer', 'gpt2')}")


def is_gptfast_checkpoint(source: str) -> bool:
    """Whether ``init_from`` names a gptfast checkpoint (a file, or a folder holding ckpt.pt), or a sharded
    one (which reading then refuses, naming ``gptfast export``)."""
    path = Path(source).expanduser()
    sharded = (path / SHARDED_MARKER).is_file() or (path / SHARDED_CHECKPOINT_DIR / SHARDED_MARKER).is_file()
    return path.is_file() or (path / CHECKPOINT_FILE).is_file() or sharded


def absolute(paths: list[str] | None) -> list[str] | None:
    return None if paths is None else [os.path.abspath(os.path.expanduser(p)) for p in paths]
