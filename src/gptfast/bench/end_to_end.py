"""End to end: GPT-2 training steps (tokens/s, MFU, peak memory) and generation (tokens/s).

Training runs batch x context tokens of random ids through forward, backward and an AdamW step,
under bf16 autocast on a GPU (float32 on the CPU), with the backend "triton" or "torch", each also
under ``torch.compile``, through ``gptfast.train``'s own optimizer and step (gradient clipping
included). The first step (which compiles) is timed apart from the steady ones. MFU is
``gptfast.train.model_flops_per_token`` times tokens/s over the measured matmul ceiling (and over
the datasheet peak, in the record's extra figures, where the GPU is known). Whole steps and
generations are timed as the kernels are (``harness.measure``).

Activation checkpointing (``AC_PROVIDERS``, ``AC_SIZES``): the same training step with each block
recomputed in the backward pass ("triton/ac-full") or all but its matmuls ("triton/ac-selective"),
against "triton" (none) in the same run, for GPT-2 124M and gpt2-xl: tokens/s and peak memory.

Kernel choices (``CHOICE_PROVIDERS``): GPT-2 124M's step with one kernel choice changed from its
default, against "triton" (the defaults) in the same run: the MLP on ``mlp_gelu`` ("triton/mlp-fused"),
the fused head's cross-entropy in two kernels ("triton/two-pass-ce"), attention's backward with dQ by
its own kernel ("triton/attn-dq-kernel") or added up with atomics ("triton/attn-atomic") instead of the
partial-dQ workspace. What a measured table decides
(``linear_bias_gelu.MEASURED_FASTER``) is filled from these.

Generation runs ``gptfast.generate`` per backend with the key/value cache, without it, and
"compiled" (``compile=True``: the static decode step compiled and replayed, CUDA graphs on a GPU),
and transformers' ``generate`` with its static cache, compiled too, on the same GPT-2 shapes (random
weights), in one run. The first call, which compiles, is timed apart (``first_call_s``).
"""

from __future__ import annotations

import dataclasses
import gc
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch

from gptfast import kernels
from gptfast.activation_checkpointing import apply_activation_checkpointing
from gptfast.generation import generate
from gptfast.kernels.cross_entropy import two_passes
from gptfast.kernels.flash_attention.launch import without_dq_workspace
from gptfast.kernels.linear_bias_gelu import choose_mlp_gelu
from gptfast.model import GPT, GPTConfig
from gptfast.train import make_optimizer, model_flops_per_token, peak_flops, train_step

from .harness import OK, REP_MS, WARMUP_MS, Record, Unavailable, measure_record
from .kernel_bench import bench_dtype

# "/unfused-head": the LM head and loss without linear_cross_entropy (the logits materialised), for the
# peak memory and speed the fused head saves.
TRAIN_PROVIDERS = ("triton", "triton/unfused-head", "torch", "triton+compile", "torch+compile")
GENERATE_PROVIDERS = ("triton", "torch", "transformers")
GENERATE_MODES = {"triton": ("cache", "compiled", "no cache"), "torch": ("cache", "compiled", "no cache"),
                  "transformers": ("static cache",)}


@dataclass(frozen=True)
class TrainSize:
    preset: str
    batch: int
    context: int
    n_layer: int | None = None  # None: the preset's; fewer keep the CPU runs short
    vocab_size: int | None = None
    vocab_multiple: int | None = None  # pad the embedding/head rows (64: GPT-2's 50257 -> 50304)

    def config(self) -> GPTConfig:
        overrides = {"n_layer": self.n_layer, "vocab_size": self.vocab_size,
                     "vocab_multiple": self.vocab_multiple}
        return GPTConfig.from_preset(self.preset, context_length=self.context,
                                     **{k: v for k, v in overrides.items() if v is not None})

    def as_dict(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


@dataclass(frozen=True)
class GenerateSize:
    model: TrainSize  # the model's preset and context (its batch is unused)
    prompts: int
    prompt_len: int
    new_tokens: int

    def as_dict(self) -> dict:
        return dict(self.model.as_dict(), batch=self.prompts, prompt_len=self.prompt_len,
                    new_tokens=self.new_tokens)


LR = 6e-4  # any rate: the benchmark times steps, it does not train
# Whole training steps and generations are timed this many times as long as a kernel case.
TRAIN_TIMING, GENERATE_TIMING = 20, 10
# CPU sizes: one layer and a small vocabulary, since the CPU runs the kernels in the interpreter.
_CPU_MODEL = TrainSize("tiny", batch=2, context=32, n_layer=1, vocab_size=512)
_GPT2 = TrainSize("gpt2", batch=16, context=1024, vocab_multiple=64)
TRAIN_SIZES = {"full": _GPT2, "small": _CPU_MODEL}
# Generation at batch 1 and 16: 64-token prompts, 256 new tokens each; on a CPU, one prompt of 8
# tokens and 8 new tokens in a context of 64.
_CPU_GENERATE_MODEL = dataclasses.replace(_CPU_MODEL, context=64)
GENERATE_SIZES = {"full": (GenerateSize(_GPT2, 1, 64, 256), GenerateSize(_GPT2, 16, 64, 256)),
                  # Kept short: the triton rows run the interpreter, and "compiled" compiles once per size.
                  "small": (GenerateSize(_CPU_GENERATE_MODEL, 1, 8, 8),)}

# Activation checkpointing's case: each mode (none is plain "triton") on GPT-2 124M and gpt2-xl, whose
# float32 weights, gradients and AdamW state (25 GB) and activations at batch 8 (about 20 GB in bf16) fit
# an 80 GB GPU without checkpointing, so that "none" is the same-run baseline at both sizes.
AC_GROUP = "train-ac"
AC_PROVIDERS = ("triton", "triton/ac-selective", "triton/ac-full")
AC_SIZES = {"full": (_GPT2, TrainSize("gpt2-xl", batch=8, context=1024, vocab_multiple=64)),
            "small": (TrainSize("tiny", batch=1, context=16, n_layer=1, vocab_size=64),)}  # three interpreted steps

# Kernel choices: each changes one choice from the default ("triton"), on GPT-2 124M: the MLP on mlp_gelu;
# the fused head's cross-entropy in two kernels (the losses, then the gradients: the logits read twice)
# instead of the one-pass kernel; attention's backward without its partial-dQ workspace, dQ by its own
# kernel (deterministic) or added up by atomics. Each: the context the step runs in, the GPTConfig fields
# it changes.
CHOICE_GROUP = "train-choices"
KERNEL_CHOICES: dict[str, tuple[Callable[[], AbstractContextManager], dict]] = {
    "mlp-fused": (lambda: choose_mlp_gelu(True), {}),
    "two-pass-ce": (two_passes, {}),
    "attn-dq-kernel": (without_dq_workspace, {}),
    "attn-atomic": (without_dq_workspace, {"deterministic_attention": False}),
}
CHOICE_PROVIDERS = ("triton", *(f"triton/{option}" for option in KERNEL_CHOICES))
CHOICE_SIZES = {"full": (_GPT2,), "small": AC_SIZES["small"]}
# The groups whose steps each change one thing from "triton": their providers and sizes.
AGAINST_DEFAULT = {AC_GROUP: (AC_PROVIDERS, AC_SIZES), CHOICE_GROUP: (CHOICE_PROVIDERS, CHOICE_SIZES)}

# The targets for GPT-2 124M training on one H100 (full sizes only).
SPEEDUP_TARGETS = (("triton", "torch", 1.5), ("triton", "torch+compile", 1.1))
TOKENS_PER_S_TARGET = ("triton+compile", 500_000)


def make_train_step(provider: str, size: TrainSize, device: torch.device) -> Callable[[], None]:
    """A training-step closure (fresh model, AdamW, random batch) for a provider like "triton+compile",
    "triton/unfused-head", "triton/ac-full" (activation checkpointing: ac-selective, ac-full),
    "triton/mlp-fused", "triton/two-pass-ce", "triton/attn-dq-kernel" or "triton/attn-atomic" (kernel
    choices)."""
    variant, _, compile_flag = provider.partition("+")
    backend, _, option = variant.partition("/")
    gc.collect()  # the previous case's model, before this one's peak memory is measured
    torch.manual_seed(0)
    choice, choice_fields = KERNEL_CHOICES.get(option, (nullcontext, {}))
    config = dataclasses.replace(size.config(), fused_lm_head=option != "unfused-head", **choice_fields)
    with device:  # built where it trains: initialising gpt2-xl on the CPU would take most of a stage
        model = GPT(config).train()
    apply_activation_checkpointing(model, option.removeprefix("ac-") if option.startswith("ac-") else "none")
    optimizer = make_optimizer(model, lr=LR)
    amp_dtype = bench_dtype(device) if device.type == "cuda" else None  # bf16 autocast on a GPU only
    if compile_flag:
        torch._dynamo.reset()
    forward = torch.compile(model) if compile_flag else model
    tokens = torch.randint(0, config.vocab_size, (size.batch, size.context + 1), device=device)
    batch = [(tokens[:, :-1], tokens[:, 1:])]

    def step() -> None:
        with kernels.use_backend(backend), choice():
            train_step(forward, optimizer, batch, lr=LR, amp_dtype=amp_dtype)

    return step


def run_train(provider: str, size: TrainSize, device: torch.device, *, warmup_ms: float = WARMUP_MS,
              rep_ms: float = REP_MS, group: str = "train") -> Record:
    """Tokens per second (and model TFLOP/s, the datasheet MFU, peak memory, the first step's seconds:
    compilation) of one training configuration, recorded in ``group``."""
    record = measure_record(Record(group, provider, "step", size.as_dict(), unit="tokens/s"),
                            lambda: (make_train_step(provider, size, device), ()), size.batch * size.context,
                            device, warmup_ms=TRAIN_TIMING * warmup_ms, rep_ms=TRAIN_TIMING * rep_ms)
    if record.status == OK:
        model_flops = record.value * model_flops_per_token(size.config())
        record.extra["model_tflops"] = model_flops / 1e12
        if peak_flops(device):
            record.extra["mfu_of_datasheet_pct"] = 100.0 * model_flops / peak_flops(device)
    return record


def generate_call(provider: str, mode: str, size: GenerateSize, device: torch.device
                  ) -> Callable[[], object]:
    """A closure generating ``size.new_tokens`` for each random prompt: ``gptfast.generate`` with
    the backend ``provider`` in ``mode`` ("cache", "no cache", "compiled"), or transformers'."""
    torch.manual_seed(0)
    config = size.model.config()
    prompts = torch.randint(0, config.vocab_size, (size.prompts, size.prompt_len))
    if provider == "transformers":
        return _transformers_call(config, prompts, size.new_tokens, device)
    model = GPT(config).to(device=device, dtype=bench_dtype(device)).eval()
    if mode == "compiled":
        torch._dynamo.reset()  # a fresh compilation per size: the recompilation limit is not reached
    options = dict(use_cache=mode != "no cache", compile=mode == "compiled")

    def run() -> list[list[int]]:
        with kernels.use_backend(provider), torch.no_grad():
            return generate(model, prompts.tolist(), size.new_tokens, temperature=1.0, seed=0, **options)

    return run


def _transformers_call(config: GPTConfig, prompts: torch.Tensor, new_tokens: int, device: torch.device
                       ) -> Callable[[], torch.Tensor]:
    """transformers' GPT-2 ``generate`` with its static cache, its decode step compiled (on a CPU too)."""
    try:
        from transformers import CompileConfig, GenerationConfig, GPT2Config, GPT2LMHeadModel
    except ImportError as error:
        raise Unavailable(f"transformers (with its static cache) is not installed: {error}") from error
    hf_config = GPT2Config(vocab_size=config.padded_vocab_size, n_positions=config.context_length,
                           n_embd=config.n_embd, n_layer=config.n_layer, n_head=config.n_head)
    model = GPT2LMHeadModel(hf_config).to(device=device, dtype=bench_dtype(device)).eval()
    compile_config = CompileConfig(fullgraph=True)
    compile_config._compile_all_devices = True  # transformers compiles only on accelerators otherwise
    generation = GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=True,
                                  top_k=0, cache_implementation="static", compile_config=compile_config,
                                  pad_token_id=0)
    input_ids = prompts.to(device)
    torch._dynamo.reset()

    def run() -> torch.Tensor:
        with torch.no_grad():
            return model.generate(input_ids, attention_mask=torch.ones_like(input_ids), generation_config=generation)

    return run


def run_generate(provider: str, mode: str, size: GenerateSize, device: torch.device, *,
                 rep_ms: float = REP_MS) -> Record:
    """Generated tokens per second of ``gptfast.generate`` in ``mode``, or of transformers' generate."""
    record = Record("generate", provider, mode, size.as_dict(), unit="tokens/s")
    return measure_record(record, lambda: (generate_call(provider, mode, size, device), ()),
                          size.prompts * size.new_tokens, device, warmup_ms=0.0, rep_ms=GENERATE_TIMING * rep_ms)
