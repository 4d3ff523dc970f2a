"""Training's options, each declared once (:func:`gptfast.options.option`) on :class:`TrainConfig`.

Every field carries its type, default, help, command-line group and flag, choices, checks and
resume policy; ``gptfast train``'s arguments, the checks and defaults of ``TrainConfig(...)``, the
resume rules (:data:`FIXED_ON_RESUME`, :data:`CHANGEABLE_ON_RESUME`, :data:`DEFAULTS`) and the
README's option table (:func:`option_table`) are generated from them.
"""

from __future__ import annotations

import argparse
import contextlib
import contextvars
import math
from collections.abc import Collection, Iterator
from dataclasses import InitVar, dataclass
from typing import Any

from . import kernels
from .activation_checkpointing import MODES as ACTIVATION_CHECKPOINTING_MODES
from .corpora import DEFAULT_TEXT_FIELD
from .data import BatchStream
from .distributed import DEFAULT_TIMEOUT_S
from .encoding import worker_count
from .memory import PARALLELISMS
from .model import PRESETS
from .options import Resume, check_fields, declarations, fill_defaults, given_options, markdown_table, option
from .precision import dtype_option
from .tokenizer import TIKTOKEN_FILE_ENV, TOKENIZERS

FIXED, CHANGEABLE = Resume.FIXED, Resume.CHANGEABLE
# Options that init_from's model decides when left out: they stay None (and a checkpoint may hold None).
INIT_FROM_DECIDES = ("preset", "tokenizer")


def positive(value: float) -> str | None:
    return None if value > 0 else "must be positive"


def probability(value: float) -> str | None:
    return None if 0.0 <= value <= 1.0 else "must be in [0, 1]"


def finite_non_negative(value: float) -> str | None:
    return None if 0.0 <= value < math.inf else "must be a finite number >= 0"


def non_negative(value: int) -> str | None:
    return None if value >= 0 else "must be >= 0"


def beta(value: float) -> str | None:
    return None if 0.0 <= value < 1.0 else "must be in [0, 1)"


def seed_range(value: int) -> str | None:
    """A seed torch's 64-bit generators take, with room for the run's per-step seeds above it."""
    return None if -(2**63) <= value < 2**63 else "must be an integer from -2**63 to 2**63 - 1"


MAX_TIMEOUT_S = 10**9  # about 31 years, well inside what a timedelta holds


def timeout(value: float) -> str | None:
    return None if 0 < value <= MAX_TIMEOUT_S else f"must be positive and at most {MAX_TIMEOUT_S:.0e} seconds"


def tiktoken_file_option(group: str) -> Any:
    """``--tiktoken-file``, of training, ``prepare``, ``generate`` and ``eval``."""
    return option(help="local GPT-2 ranks file for offline use", group=group, metavar="PATH",
                  default_help=f"${TIKTOKEN_FILE_ENV}, else tiktoken downloads it")


@dataclass
class TrainConfig:
    """Everything a run needs; ``gptfast train --help`` and the README's table describe each field.

    An option left out holds its declared default once constructed, except that with ``init_from``
    the preset and tokenizer left out stay None (they are init_from's, settled by the run). Which of
    the options that resuming takes from the checkpoint (``resume=FIXED`` or ``CHANGEABLE``) were
    given is recorded in ``given`` (:func:`~gptfast.options.given_options`; ``dataclasses.replace``
    passes it on): a resumed run replaces the others with the checkpoint's values, while a given
    FIXED one must agree with the checkpoint and a given CHANGEABLE one replaces the checkpoint's
    (the change is printed).
    """

    # data
    data: list[str] | None = option(
        help="a folder made by `gptfast prepare`, or text files/folders (prepared into OUT_DIR/data first); "
        "none: the embedded corpus", group="data", resume=FIXED, flag="DATA")
    tokenizer: str | None = option(
        "char", help="tokenizer for text that needs preparing", group="data", resume=FIXED, choices=TOKENIZERS,
        default_help="char; gpt2 with a Hugging Face --init-from")
    include: list[str] | None = option(
        [], help="read only the files of input folders whose name or path below the folder matches GLOB "
        "(repeatable), e.g. '*.txt'", group="data", resume=FIXED, metavar="GLOB")
    exclude: list[str] | None = option(
        [], help="leave out the files of input folders matching GLOB (repeatable)", group="data", resume=FIXED,
        metavar="GLOB")
    tiktoken_file: str | None = tiktoken_file_option(group="data")
    text_field: str | None = option(
        DEFAULT_TEXT_FIELD, help="the field of .jsonl(.gz/.zst), .parquet and .arrow records that holds the text",
        group="data", resume=FIXED, metavar="NAME")
    strict: bool = option(False, help="refuse a bad record (invalid JSON, a missing or non-string text field) "
                          "instead of skipping and counting it", group="data")
    workers: int | None = option(help="processes that tokenize text being prepared; the data is the same for any N",
                                 group="data", metavar="N", check=worker_count, default_help="one per core")
    order: str | None = option("random", help="batch order", group="data", resume=FIXED, choices=BatchStream.ORDERS)
    # model
    preset: str | None = option("tiny", help="model size", group="model", resume=FIXED, choices=tuple(PRESETS))
    init_from: str | None = option(
        help="start from these weights and fine-tune: gpt2, gpt2-medium... (downloaded), a local Hugging Face "
        "GPT-2 folder, or a gptfast checkpoint (its ckpt.pt or out_dir); GPT-2 needs data tokenized with "
        "--tokenizer gpt2", group="model", resume=FIXED, metavar="SOURCE")
    context_length: int | None = option(help="tokens per sequence", group="model", resume=FIXED, metavar="T",
                                        check=positive, default_help="the preset's or --init-from's, which it "
                                        "may shorten")
    dropout: float | None = option(0.0, help="dropout rate", group="model", resume=FIXED, check=probability)
    # optimization
    batch_size: int | None = option(16, help="sequences per micro-batch and process", group="optimization",
                                    resume=FIXED, check=positive)
    grad_accum: int | None = option(1, help="micro-batches per step and process", group="optimization",
                                    resume=FIXED, check=positive)
    tokens_per_step: int | None = option(help="tokens per optimizer step over all processes; sets --grad-accum",
                                         group="optimization", metavar="N", check=positive)
    max_steps: int | None = option(500, help="optimizer steps, the length of the schedule", group="optimization",
                                   resume=CHANGEABLE, check=positive)
    run_steps: int | None = option(help="stop after N steps in this run, with a checkpoint to --resume from",
                                   group="optimization", metavar="N", check=positive)
    lr: float | None = option(1e-3, help="peak learning rate", group="optimization", resume=CHANGEABLE,
                              check=finite_non_negative)
    min_lr: float | None = option(help="learning rate at the end of the cosine decay", group="optimization",
                                  resume=CHANGEABLE, default_help="lr/10", check=finite_non_negative)
    warmup_steps: int | None = option(50, help="steps of linear warm-up", group="optimization", resume=CHANGEABLE,
                                      check=non_negative)
    weight_decay: float | None = option(0.1, help="AdamW weight decay, matrices only", group="optimization",
                                        resume=CHANGEABLE, check=finite_non_negative)
    beta1: float | None = option(0.9, help="AdamW beta1", group="optimization", resume=CHANGEABLE, check=beta)
    beta2: float | None = option(0.95, help="AdamW beta2", group="optimization", resume=CHANGEABLE, check=beta)
    grad_clip: float | None = option(1.0, help="clip the gradient norm to this; 0: no clipping",
                                     group="optimization", resume=CHANGEABLE, check=finite_non_negative)
    label_smoothing: float | None = option(0.0, help="label smoothing of the loss, as torch's cross_entropy",
                                           group="optimization", resume=CHANGEABLE, check=probability)
    z_loss: float | None = option(0.0, help="weight of the z-loss, z * logsumexp(logits)^2 per position",
                                  group="optimization", resume=CHANGEABLE, check=finite_non_negative)
    seed: int | None = option(1337, help="random seed", group="optimization", resume=FIXED, check=seed_range)
    # run
    out_dir: str = option("out", help="checkpoint, log.jsonl and loss.png go here", group="run")
    resume: bool = option(False, help="continue from OUT_DIR/ckpt.pt", group="run")
    overwrite: bool = option(False, help="start afresh even if OUT_DIR holds a checkpoint", group="run")
    eval_interval: int | None = option(100, help="validate and checkpoint every N steps",
                                       group="run", resume=CHANGEABLE, check=positive)
    eval_batches: int | None = option(10, help="batches per validation", group="run", resume=CHANGEABLE,
                                      check=positive)
    hellaswag: str | None = option(help="also score this HellaSwag-format JSONL file (acc, acc_norm) every "
                                   "--hellaswag-every steps, logged beside the validation loss", group="run",
                                   metavar="FILE")
    hellaswag_every: int | None = option(help="score --hellaswag every N steps", group="run", metavar="N",
                                         check=positive, default_help="--eval-interval")
    log_interval: int | None = option(10, help="log to the console and log.jsonl every N steps", group="run",
                                      resume=CHANGEABLE, check=positive)
    device: str = option("auto", help="cpu, cuda, cuda:1...", group="run", default_help="auto: the process's GPU "
                         "under torchrun, else cuda if present, else cpu")
    dtype: str | None = dtype_option("autocast", "float16 with loss scaling", group="run", resume=CHANGEABLE)
    compile: bool = option(False, help="torch.compile the model (each block under --parallel fsdp)", group="run")
    parallel: str = option("ddp", help="ddp: every process holds the whole model; fsdp: parameters, gradients and "
                           "optimizer state sharded over the processes (FSDP2), checkpoints sharded", group="run",
                           choices=PARALLELISMS)
    reshard_after_forward: bool = option(False, help="under --parallel fsdp, free each block's gathered weights "
                                         "after its forward and gather them again for the backward: less memory, "
                                         "one more all-gather per block", group="run")
    activation_checkpointing: str = option(
        "none", help="keep less of each block's forward for the backward pass and recompute the rest: full (only "
        "the block's input), selective (the matmul and attention outputs); same gradients, less memory, more "
        "compute", group="run", choices=ACTIVATION_CHECKPOINTING_MODES)
    deterministic: bool = option(
        True, help="attention's backward adds dQ up with atomics (Triton) where its dQ workspace would pass 1 GiB "
        "(long sequences): 5 matmuls per score instead of 7 there, but gradients vary in their last bits run to "
        "run, so a resumed run is no longer bitwise the same", group="run", flag="--nondeterministic")
    sample_tokens: int = option(300, help="tokens to generate at the end; 0: none", group="run", check=non_negative)
    sample_prompt: str = option("\n", help="prompt of the final sample", group="run", default_help="a line break")
    backend: str = option("auto", help="kernel backend, as `gptfast --backend`", group="run",
                          choices=kernels.BACKENDS, cli_default=argparse.SUPPRESS,
                          default_help="$GPTFAST_BACKEND or auto")
    progress: bool = option(True, help="no progress bar: a line every --log-interval steps instead (as without a "
                            "terminal)", group="run", flag="--no-progress")
    tensorboard: bool = option(False, help="also log the scalars of log.jsonl to OUT_DIR/tensorboard (needs the "
                               "tensorboard package)", group="run")
    ddp_timeout: float = option(DEFAULT_TIMEOUT_S, help="under torchrun, how long a collective waits for a stopped "
                                "or dead peer before the run ends with an error", group="run", metavar="SECONDS",
                                check=timeout)

    # Not an option: __post_init__ sets the attribute ``given``, which dataclasses.replace passes back in.
    given: InitVar[Collection[str] | None] = None

    def __post_init__(self, given: Collection[str] | None) -> None:
        check_fields(self, named)
        self.given = given_options(self, given)
        fill_defaults(self, skip=INIT_FROM_DECIDES if self.init_from else ())
        if self.resume and self.overwrite:
            raise ValueError(f"{named('resume', True)} and {named('overwrite', True)} contradict each other: "
                             "choose one")

    def is_given(self, name: str) -> bool:
        """Whether option ``name`` holds a value given (:attr:`given`), or set since to another than its default."""
        value = getattr(self, name)
        return value is not None and (name in self.given or value != OPTIONS[name].default)


OPTIONS = declarations(TrainConfig)
# The defaults of the options a checkpoint gives (an older checkpoint may lack some).
DEFAULTS = {name: o.default for name, o in OPTIONS.items() if o.resume is not Resume.RUN and o.default is not None}
# Options that fix what a run computes: on resume they default to the checkpoint's and may not contradict it.
FIXED_ON_RESUME = tuple(name for name, o in OPTIONS.items() if o.resume is FIXED)
# Options a resumed run takes from the checkpoint unless given; a given one is applied and printed.
CHANGEABLE_ON_RESUME = tuple(name for name, o in OPTIONS.items() if o.resume is CHANGEABLE)

_CLI_SPELLING = contextvars.ContextVar("gptfast_cli_spelling", default=False)


def named(name: str, value: object = None) -> str:
    """How a message names a TrainConfig field: ``resume=True`` to Python callers, ``--resume`` in the CLI."""
    if _CLI_SPELLING.get():
        flag = OPTIONS[name].spelling
        return flag if value is None or isinstance(value, bool) else f"{flag} {value}"
    return name if value is None else f"{name}={value!r}"


@contextlib.contextmanager
def cli_options() -> Iterator[None]:
    """Inside this block, messages name options as command-line flags (the CLI's train command)."""
    token = _CLI_SPELLING.set(True)
    try:
        yield
    finally:
        _CLI_SPELLING.reset(token)


def option_table() -> str:
    """The README's table of training options (tests/test_readme.py checks that it is current)."""
    return markdown_table(TrainConfig)
