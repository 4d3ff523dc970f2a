"""The ``gptfast`` command line: one subcommand per task (``gptfast --help`` lists them)."""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

from . import __version__, kernels, memory
from .checkpoint import FORMAT, INFERENCE_FIELDS, build_model, checkpoint_path, load_checkpoint, save_checkpoint
from .cli_inference import add_eval_parser, add_generate_parser
from .config import CHANGEABLE_ON_RESUME, FIXED_ON_RESUME, OPTIONS, TrainConfig, cli_options
from .corpora import DEFAULT_TEXT_FIELD
from .data import DEFAULT_SHARD_TOKENS, FORMATS, SHARDS_FORMAT, prepare
from .interrupt import exit_code
from .kernels.backend import HAS_TRITON, TRITON_INTERPRET
from .kernels.registry import SPECS
from .lab import add_lab_parser
from .model import GPT, PRESETS, GPTConfig
from .options import add_arguments, from_arguments, positive_int
from .precision import AMP_DTYPES
from .sharded_checkpoint import consolidate, is_sharded_checkpoint
from .tokenizer import GPT2_VOCAB_SIZE, TOKENIZERS
from .train import train

BACKEND_HELP = "kernel backend (default: $GPTFAST_BACKEND or auto)"


def _preset_table(vocab_size: int) -> str:
    """Size and memory of every preset for a vocabulary of ``vocab_size`` tokens, named in the first line."""
    if vocab_size == GPT2_VOCAB_SIZE:
        vocabulary = (f"GPT-2's vocabulary of {vocab_size:,} tokens (char-level data has one token per distinct "
                      "character, about 100 for the embedded corpus: gptfast info --vocab-size 100)")
    else:
        vocabulary = f"a vocabulary of {vocab_size:,} tokens"
    rows = [f"parameters for {vocabulary}",
            f"{'preset':<12} {'layers':>6} {'heads':>5} {'n_embd':>6} {'context':>7} {'params':>15} "
            f"{'fp32 weights':>12}"]
    for name in PRESETS:
        config = GPTConfig.from_preset(name, vocab_size=vocab_size)
        with torch.device("meta"):
            n = GPT(config).num_parameters()
        rows.append(f"{name:<12} {config.n_layer:>6} {config.n_head:>5} {config.n_embd:>6} "
                    f"{config.context_length:>7} {n:>15,} {n * 4 / 2**20:>9.1f} MB")
    return "\n".join(rows)


def _fit_table(args: argparse.Namespace) -> str:
    """Will it fit? The memory one GPU needs to train each preset (or ``--preset``), by part
    (:func:`gptfast.memory.training_estimate`), for the world size, parallelism, activation
    checkpointing, micro-batch, context and autocast dtype given."""
    # "auto" autocasts to bfloat16 on the GPUs that have it, which are what the estimate is for.
    amp_dtype = torch.bfloat16 if args.dtype in (None, "auto") else AMP_DTYPES[args.dtype]
    batch = args.batch_size or OPTIONS["batch_size"].default
    mode = args.activation_checkpointing
    context = f"x {args.context_length}" if args.context_length else "x the preset's context"
    rows = [f"training memory per GPU (estimate): {args.world_size} GPU(s), {args.parallel}, activation "
            f"checkpointing {mode}, micro-batch {batch} {context}, activations in "
            f"{str(amp_dtype or torch.float32).removeprefix('torch.')}",
            f"{'preset':<12} {'parameters':>11} {'gradients':>11} {'optimizer':>11} {'activations':>11} {'total':>11}"]
    for name in [args.preset] if args.preset else PRESETS:
        overrides = {"context_length": args.context_length} if args.context_length else {}
        config = GPTConfig.from_preset(name, vocab_size=args.vocab_size, **overrides)
        estimate = memory.training_estimate(config, batch, amp_dtype, world_size=args.world_size,
                                            parallel=args.parallel, activation_checkpointing=mode)
        parts = (estimate.parameters, estimate.gradients, estimate.optimizer, estimate.activations, estimate.total)
        rows.append(f"{name:<12} " + " ".join(f"{memory.gigabytes(n):>11}" for n in parts))
    return "\n".join(rows)


def _backend_report(device: str) -> str:
    """Which path each registered op takes for GPT-2-sized bf16 inputs on ``device``, and why
    (``OpSpec.example``), as ``kernels.explain`` decides it: on the "triton" backend, an op its kernel
    cannot run here is refused, as it would be in training."""
    routes = [kernels.explain(spec.name, **spec.example(device, torch.bfloat16)) for spec in SPECS.values()]
    lines = [f"  {r}" for r in routes]
    if any(r.refused for r in routes):
        lines.append("  train, generate and eval stop at the first refused op on this backend: choose auto or torch")
    return "\n".join(lines)


def _check_forward_fits(preset: str, config: GPTConfig, device: str) -> None:
    """Refuse ``info --forward`` before building a model whose float32 weights and logits (2 x 2 windows)
    exceed the device's memory (``gptfast.memory``)."""
    needed = memory.model_bytes(config) + 4 * config.context_length * config.padded_vocab_size * 4
    total = memory.total_bytes(torch.device(device))
    if total is not None and needed > total:
        holder = "the GPU's" if device == "cuda" else "this machine's"
        raise ValueError(f"--forward {preset} with a vocabulary of {config.vocab_size:,}: its float32 weights and "
                         f"logits need {memory.gigabytes(needed)}, more than {holder} {memory.gigabytes(total)}")


def cmd_info(args: argparse.Namespace) -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    backend = kernels.get_backend()  # first: a bad $GPTFAST_BACKEND is refused before anything is printed
    print(f"torch {torch.__version__}, triton {'installed' if HAS_TRITON else 'not installed'}"
          f"{' (interpreter)' if TRITON_INTERPRET else ''}, device {device}"
          + (f" ({torch.cuda.get_device_name()})" if device == "cuda" else ""))
    print(f"backend: {backend}; paths for bf16 GPT-2-sized inputs on {device}:")
    print(_backend_report(device))
    print()
    print(_preset_table(args.vocab_size))
    print()
    print(_fit_table(args))
    if args.forward:
        config = GPTConfig.from_preset(args.forward, vocab_size=args.vocab_size)
        _check_forward_fits(args.forward, config, device)
        model = GPT(config).to(device).eval()
        idx, targets = torch.randint(0, config.vocab_size, (2, 2, config.context_length), device=device)
        with torch.no_grad():
            logits, loss = model(idx, targets, return_logits=True)
        print(f"\nforward pass of {args.forward!r} on {device}: logits {tuple(logits.shape)}, "
              f"loss {loss.item():.3f} (untrained: ln(vocab) = {torch.log(torch.tensor(config.vocab_size)):.3f})")


def cmd_prepare(args: argparse.Namespace) -> None:
    if args.shard_tokens is not None and args.format != SHARDS_FORMAT:
        raise ValueError(f"--shard-tokens applies to --format {SHARDS_FORMAT} only (this is --format {args.format})")
    meta = prepare(args.inputs or None, args.out, tokenizer=args.tokenizer, val_fraction=args.val_fraction,
                   tiktoken_file=args.tiktoken_file, include=args.include or (), exclude=args.exclude or (),
                   text_field=DEFAULT_TEXT_FIELD if args.text_field is None else args.text_field,
                   strict=args.strict, workers=args.workers, format=args.format,
                   shard_tokens=args.shard_tokens or DEFAULT_SHARD_TOKENS)
    shards = f" in {len(meta['sources'])} llm.c shards" if meta["format"] == SHARDS_FORMAT else ""
    print(f"{meta['num_tokens']:,} tokens ({meta['num_val_tokens']:,} for validation), {meta['dtype']}, "
          f"vocabulary {meta['tokenizer']['kind']} -> {args.out}{shards}")


def cmd_train(args: argparse.Namespace) -> None:
    # --backend, after `train` or before it; else $GPTFAST_BACKEND (or auto), as for every command.
    fields = {**from_arguments(TrainConfig, args), "backend": args.backend or kernels.get_backend()}
    with cli_options():  # messages name --options, not TrainConfig fields
        summary = train(TrainConfig(**fields))
    if summary.get("signal"):  # stopped by SIGINT/SIGTERM, checkpoint saved: 130/143, as schedulers expect
        raise SystemExit(exit_code(summary["signal"]))


def cmd_export(args: argparse.Namespace) -> None:
    out = Path(args.out).expanduser()
    if out.exists() or out.is_symlink():
        raise FileExistsError(f"--out {str(out)!r} exists: export never overwrites; choose another path")
    single = checkpoint_path(args.checkpoint)
    if out.suffix != ".pt" and single.is_file() and not is_sharded_checkpoint(args.checkpoint):
        source, state = single, load_checkpoint(single, require=INFERENCE_FIELDS)  # a single file, to Hugging Face
    else:
        source, state = Path(args.checkpoint), consolidate(args.checkpoint)
    step = f"step {state['step']}" if "step" in state else "the model"
    if out.suffix == ".pt":
        save_checkpoint(out, {key: value for key, value in state.items() if key != "format"} | {"format": FORMAT})
        print(f"{step} of {args.checkpoint} -> {out}: generate, eval and train --resume read it")
    else:
        from .pretrained import save_pretrained

        save_pretrained(build_model(state, source), out)
        print(f"{step} of {args.checkpoint} -> {out}: a Hugging Face GPT-2 folder "
              "(GPT2LMHeadModel.from_pretrained, generate --pretrained)")


def cmd_bench(args: argparse.Namespace) -> None:
    # The benchmarks import the package, never the reverse: they run as their own module.
    code = subprocess.call([sys.executable, "-m", "gptfast.bench", *args.bench_args])
    if code:
        raise SystemExit(code)


def _resume_rule() -> str:
    """The train command's help on --resume, from the options' declared resume policies."""
    fixed, changeable = (", ".join(OPTIONS[name].spelling for name in names)
                         for names in (FIXED_ON_RESUME, CHANGEABLE_ON_RESUME))
    text = (f"On --resume, an option left out is the checkpoint's. Given, one of {fixed} must agree with it; "
            f"one of {changeable} replaces it (and the change is printed). A prepared data folder that has "
            "moved is given as DATA: it must hold the data the checkpoint records.")
    return textwrap.fill(text, 100, break_on_hyphens=False) + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gptfast", description="GPT-2 training and sampling with hand-written "
                                     "Triton kernels.", epilog='"gptfast COMMAND --help" describes a command.')
    parser.add_argument("--version", action="version", version=f"gptfast {__version__} (distribution gptfast-triton)")
    parser.add_argument("--backend", choices=kernels.BACKENDS, help=BACKEND_HELP)
    sub = parser.add_subparsers(dest="command", required=True)
    for add_command in (_add_prepare_parser, _add_train_parser, add_generate_parser, add_eval_parser,
                        _add_export_parser, _add_info_parser, _add_bench_parser, add_lab_parser):
        add_command(sub)
    _accept_backend_after_every_command(sub)
    return parser


def _add_prepare_parser(sub) -> None:
    prep = sub.add_parser("prepare", help="tokenize text files or folders into a data folder for training",
                          description="Tokenize text into OUT/tokens.bin (uint16 when the vocabulary fits) "
                          "and OUT/meta.json; the last --val-fraction of the tokens is the validation split.")
    prep.add_argument("inputs", nargs="*", metavar="INPUT",
                      help="UTF-8 text files, .jsonl(.gz/.zst), .parquet or .arrow record files, or folders of "
                      "them (read recursively); none: the embedded corpus")
    prep.add_argument("--out", required=True, help="data folder to write")
    prep.add_argument("--tokenizer", choices=TOKENIZERS, default="char",
                      help="char: a vocabulary of the text's characters; gpt2: GPT-2 BPE (default: %(default)s)")
    prep.add_argument("--val-fraction", type=float, default=0.1,
                      help="fraction of tokens held out for validation (default: %(default)s)")
    prep.add_argument("--format", choices=FORMATS, default="tokens", help="tokens: OUT/tokens.bin and OUT/meta.json; "
                      "llmc: llm.c's .bin shards (GPT-2 tokens, the validation split in *_val_* shards) in a new "
                      "or empty OUT (default: %(default)s)")
    prep.add_argument("--shard-tokens", type=positive_int, metavar="N",
                      help=f"tokens per llm.c shard, with --format llmc (default: {DEFAULT_SHARD_TOKENS:,}, llm.c's)")
    add_arguments(prep, TrainConfig, names=("tiktoken_file", "include", "exclude", "text_field", "strict", "workers"))
    prep.set_defaults(func=cmd_prepare)


def _add_train_parser(sub) -> None:
    """gptfast train: TrainConfig's options, as declared, in their groups."""
    trn = sub.add_parser("train", help="train a GPT (also under torchrun for several GPUs)",
                         usage="%(prog)s [DATA ...] [options]",  # a bad option's error then fits on two lines
                         description="Train a GPT on prepared data or on text. Ctrl-C stops after the current\n"
                         "step and writes the checkpoint; --resume continues exactly. Under `torchrun\n"
                         "--nproc_per_node N` the same command trains with DistributedDataParallel.",
                         epilog="examples:\n"
                         "  gptfast train                                  # tiny model, embedded corpus\n"
                         "  gptfast train notes.txt --preset mini --max-steps 2000\n"
                         "  gptfast train notes.txt --preset mini --max-steps 2000 --resume\n"
                         "  torchrun --nproc_per_node 8 -m gptfast train data/owt --preset gpt2 "
                         "--tokens-per-step 524288\n\n" + _resume_rule(),
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(trn, TrainConfig)
    trn.set_defaults(func=cmd_train)


def _add_export_parser(sub) -> None:
    export = sub.add_parser("export", help="make a sharded checkpoint (train --parallel fsdp) one file, or a "
                            "checkpoint a Hugging Face folder", description="Gather a sharded checkpoint's model "
                            "and optimizer state whole, into one gptfast checkpoint file (OUT ending in .pt: "
                            "generate, eval and train --resume read it) or a Hugging Face GPT-2 folder (any other "
                            "OUT; a single-file ckpt.pt can be exported to one too). Needs the memory of the whole "
                            "model and its optimizer state.")
    export.add_argument("checkpoint", metavar="CKPT", help="a sharded checkpoint folder, or the out_dir holding it; "
                        "for a Hugging Face OUT, a ckpt.pt too")
    export.add_argument("--out", required=True, metavar="FILE_OR_FOLDER",
                        help="FILE.pt: a gptfast checkpoint; otherwise a Hugging Face folder (never overwritten)")
    export.set_defaults(func=cmd_export)


# The largest vocabulary a data folder can hold: its token ids are stored as uint32 (data.py).
MAX_VOCAB_SIZE = 2**32


def _vocab_size(text: str) -> int:
    """argparse's ``type=`` of ``info --vocab-size``: 1 to MAX_VOCAB_SIZE, checked before anything is built."""
    value = positive_int(text)
    if value > MAX_VOCAB_SIZE:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_VOCAB_SIZE:,} (token ids are stored as uint32), "
                                         f"got {value:,}")
    return value


def _add_info_parser(sub) -> None:
    info = sub.add_parser("info", help="parameter counts and memory per preset, and which backend "
                          "path each operation takes on this machine",
                          description="The versions of torch and Triton, the device, which path (Triton kernel or "
                          "eager PyTorch) each operation takes there for GPT-2-sized inputs, and each preset's "
                          "parameter count and memory for a vocabulary size (GPT-2's unless --vocab-size).")
    info.add_argument("--vocab-size", type=_vocab_size, default=GPT2_VOCAB_SIZE, metavar="N",
                      help="vocabulary size for the parameter counts (default: GPT-2's, %(default)s; char-level data "
                      f"has one token per distinct character; at most {MAX_VOCAB_SIZE:,})")
    info.add_argument("--forward", metavar="PRESET", choices=list(PRESETS),
                      help="also run one forward pass of this preset")
    fit = info.add_argument_group("will it fit? (the training memory estimate per GPU)")
    fit.add_argument("--world-size", type=positive_int, default=1, metavar="N",
                     help="GPUs training together (default: %(default)s)")
    fit.add_argument("--preset", choices=list(PRESETS), help="this preset only (default: every preset)")
    add_arguments(fit, TrainConfig, names=("parallel", "batch_size", "context_length", "activation_checkpointing",
                                                "dtype"))
    info.set_defaults(func=cmd_info)


def _add_bench_parser(sub) -> None:
    # Every argument after "bench" goes to the benchmark's own parser: this one reads no options.
    bench = sub.add_parser("bench", add_help=False, prefix_chars="+", help="benchmark the kernels, training "
                           "and generation against their baselines and write a report (gptfast bench --help)")
    bench.add_argument("bench_args", nargs="*")
    bench.set_defaults(func=cmd_bench)


def _accept_backend_after_every_command(sub) -> None:
    """--backend after the command as well as before it, for every command that reads options (not bench)."""
    for command in sub.choices.values():
        if "-" in command.prefix_chars and "--backend" not in command._option_string_actions:
            command.add_argument("--backend", choices=kernels.BACKENDS, default=argparse.SUPPRESS, help=BACKEND_HELP)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        kernels.set_backend(args.backend or kernels.get_backend())  # a bad $GPTFAST_BACKEND: one line
        args.func(args)
    except (ValueError, OSError, ImportError, FloatingPointError, kernels.BackendError) as error:
        print(f"gptfast {args.command}: error: {error}", file=sys.stderr)  # expected: the message, no traceback
        return 2
    except KeyboardInterrupt as error:  # a second Ctrl-C (or SIGTERM): the last checkpoint is kept
        signum = getattr(error, "signum", signal.SIGINT)
        print(f"gptfast {args.command}: interrupted ({signal.Signals(signum).name})", file=sys.stderr)
        return exit_code(signum)
    return 0


if __name__ == "__main__":
    sys.exit(main())
