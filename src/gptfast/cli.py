"""The ``gptfast`` command line: one subcommand per task (``gptfast --help`` lists them)."""

from __future__ import annotations

import argparse
import math
import signal
import subprocess
import sys
import time

import torch

from . import __version__, kernels
from .data import BatchStream, TokenData, prepare
from .evaluate import split_loss
from .generation import DEFAULT_TEMPERATURE, collect, stream
from .interrupt import exit_code
from .kernels.backend import HAS_TRITON, TRITON_INTERPRET
from .lab import add_lab_parser
from .model import GPT, PRESETS, GPTConfig
from .precision import AMP_DTYPES, amp_dtype_for
from .tokenizer import GPT2_VOCAB_SIZE, TIKTOKEN_FILE_ENV, TOKENIZERS
from .train import DEFAULTS, TrainConfig, cli_options, train

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
            f"{'fp32 weights':>12} {'train mem*':>10}"]
    for name in PRESETS:
        config = GPTConfig.from_preset(name, vocab_size=vocab_size)
        with torch.device("meta"):
            n = GPT(config).num_parameters()
        # Weights, gradients and AdamW's two moments in float32: 16 bytes per parameter.
        rows.append(f"{name:<12} {config.n_layer:>6} {config.n_head:>5} {config.n_embd:>6} "
                    f"{config.context_length:>7} {n:>15,} {n * 4 / 2**20:>9.1f} MB {n * 16 / 2**30:>7.2f} GB")
    rows.append("* weights + gradients + AdamW state in float32, before activations")
    return "\n".join(rows)


def _backend_report(device: str) -> str:
    """Which path each operation takes for GPT-2-sized inputs on ``device``, and why."""
    x = torch.empty(8, 1024, 768, device=device, dtype=torch.bfloat16)
    w = torch.empty(768, device=device, dtype=torch.bfloat16)
    h = torch.empty(8, 1024, 3072, device=device, dtype=torch.bfloat16)
    b = torch.empty(3072, device=device, dtype=torch.bfloat16)
    q = torch.empty(8, 12, 1024, 64, device=device, dtype=torch.bfloat16)
    vocab = GPTConfig(vocab_multiple=64).padded_vocab_size
    logits = torch.empty(8, 1, vocab, device=device, dtype=torch.bfloat16)  # the route depends on the row only
    targets = torch.empty(8, 1, device=device, dtype=torch.long)
    routes = [kernels.explain("layer_norm", x, w, w), kernels.explain("bias_gelu", h, b),
              kernels.explain("flash_attention", q, q, q), kernels.explain("cross_entropy", logits, targets)]
    return "\n".join(f"  {r}" for r in routes)


def cmd_info(args: argparse.Namespace) -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"torch {torch.__version__}, triton {'installed' if HAS_TRITON else 'not installed'}"
          f"{' (interpreter)' if TRITON_INTERPRET else ''}, device {device}"
          + (f" ({torch.cuda.get_device_name()})" if device == "cuda" else ""))
    print(f"backend: {kernels.get_backend()}; paths for bf16 GPT-2-sized inputs on {device}:")
    print(_backend_report(device))
    print()
    print(_preset_table(args.vocab_size))
    if args.forward:
        config = GPTConfig.from_preset(args.forward, vocab_size=args.vocab_size)
        model = GPT(config).to(device).eval()
        idx, targets = torch.randint(0, config.vocab_size, (2, 2, config.context_length), device=device)
        with torch.no_grad():
            logits, loss = model(idx, targets, return_logits=True)
        print(f"\nforward pass of {args.forward!r} on {device}: logits {tuple(logits.shape)}, "
              f"loss {loss.item():.3f} (untrained: ln(vocab) = {torch.log(torch.tensor(config.vocab_size)):.3f})")


def cmd_prepare(args: argparse.Namespace) -> None:
    meta = prepare(args.inputs or None, args.out, tokenizer=args.tokenizer, val_fraction=args.val_fraction,
                   tiktoken_file=args.tiktoken_file, include=args.include or (), exclude=args.exclude or ())
    print(f"{meta['num_tokens']:,} tokens ({meta['num_val_tokens']:,} for validation), {meta['dtype']}, "
          f"vocabulary {meta['tokenizer']['kind']} -> {args.out}")


def cmd_train(args: argparse.Namespace) -> None:
    fields = {f: getattr(args, f) for f in TrainConfig.__dataclass_fields__ if hasattr(args, f)}
    # --backend, after `train` or before it; else $GPTFAST_BACKEND (or auto), as for every command.
    fields.update(data=args.data or None, backend=args.backend or kernels.get_backend())
    with cli_options():  # messages name --options, not TrainConfig fields
        summary = train(TrainConfig(**fields))
    if summary.get("signal"):  # stopped by SIGINT/SIGTERM, checkpoint saved: 130/143, as schedulers expect
        raise SystemExit(exit_code(summary["signal"]))


def _add_train_arguments(p: argparse.ArgumentParser) -> None:
    d = TrainConfig()
    data = p.add_argument_group("data")
    data.add_argument("data", nargs="*", default=None, metavar="DATA",
                      help="a folder made by `gptfast prepare`, or text files/folders (prepared into "
                           "OUT_DIR/data first); none: the embedded corpus")
    data.add_argument("--tokenizer", choices=TOKENIZERS, default=d.tokenizer,
                      help=f"tokenizer for text that needs preparing (default: {DEFAULTS['tokenizer']}; gpt2 "
                      "with a Hugging Face --init-from)")
    _add_file_choice_arguments(data)
    data.add_argument("--tiktoken-file", metavar="PATH", help="local GPT-2 ranks file for offline use "
                      f"(default: ${TIKTOKEN_FILE_ENV}, else tiktoken downloads it)")
    data.add_argument("--order", choices=BatchStream.ORDERS, default=d.order,
                      help=f"batch order (default: {DEFAULTS['order']})")
    model = p.add_argument_group("model", "On --resume, an option of this group, --order, --seed, --batch-size or "
                                 "--grad-accum left out is the checkpoint's; one given must agree with it.")
    model.add_argument("--preset", choices=list(PRESETS), default=d.preset,
                       help=f"model size (default: {DEFAULTS['preset']})")
    model.add_argument("--init-from", metavar="SOURCE", help="start from these weights and fine-tune: gpt2, "
                       "gpt2-medium... (downloaded), a local Hugging Face GPT-2 folder, or a gptfast checkpoint "
                       "(its ckpt.pt or out_dir); GPT-2 needs data tokenized with --tokenizer gpt2")
    model.add_argument("--context-length", type=int, metavar="T", help="tokens per sequence (default: the preset's "
                       "or --init-from's, which it may shorten)")
    model.add_argument("--dropout", type=float, default=d.dropout,
                       help=f"dropout rate (default: {DEFAULTS['dropout']})")
    opt = p.add_argument_group("optimization")
    opt.add_argument("--batch-size", type=int, default=d.batch_size,
                     help=f"sequences per micro-batch and process (default: {DEFAULTS['batch_size']})")
    opt.add_argument("--grad-accum", type=int, default=d.grad_accum,
                     help=f"micro-batches per step and process (default: {DEFAULTS['grad_accum']})")
    opt.add_argument("--tokens-per-step", type=int, metavar="N",
                     help="tokens per optimizer step over all processes; sets --grad-accum")
    opt.add_argument("--max-steps", type=int, default=d.max_steps,
                     help="optimizer steps, the length of the schedule (default: %(default)s)")
    opt.add_argument("--run-steps", type=int, metavar="N",
                     help="stop after N steps in this run, with a checkpoint to --resume from")
    opt.add_argument("--lr", type=float, default=d.lr, help="peak learning rate (default: %(default)s)")
    opt.add_argument("--min-lr", type=float, help="learning rate at the end of the cosine decay (default: lr/10)")
    opt.add_argument("--warmup-steps", type=int, default=d.warmup_steps,
                     help="steps of linear warm-up (default: %(default)s)")
    opt.add_argument("--weight-decay", type=float, default=d.weight_decay,
                     help="AdamW weight decay, matrices only (default: %(default)s)")
    opt.add_argument("--beta1", type=float, default=d.beta1, help="AdamW beta1 (default: %(default)s)")
    opt.add_argument("--beta2", type=float, default=d.beta2, help="AdamW beta2 (default: %(default)s)")
    opt.add_argument("--grad-clip", type=float, default=d.grad_clip,
                     help="clip the gradient norm to this; 0: no clipping (default: %(default)s)")
    opt.add_argument("--label-smoothing", type=float, default=d.label_smoothing,
                     help="label smoothing of the loss, as torch's cross_entropy (default: %(default)s)")
    opt.add_argument("--z-loss", type=float, default=d.z_loss,
                     help="weight of the z-loss, z * logsumexp(logits)^2 per position (default: %(default)s)")
    opt.add_argument("--seed", type=int, default=d.seed, help=f"random seed (default: {DEFAULTS['seed']})")
    run = p.add_argument_group("run")
    run.add_argument("--out-dir", default=d.out_dir,
                     help="checkpoint, log.jsonl and loss.png go here (default: %(default)s)")
    run.add_argument("--resume", action="store_true", help="continue from OUT_DIR/ckpt.pt")
    run.add_argument("--overwrite", action="store_true", help="start afresh even if OUT_DIR holds a checkpoint")
    run.add_argument("--eval-interval", type=int, default=d.eval_interval,
                     help="validate and checkpoint every N steps (default: %(default)s)")
    run.add_argument("--eval-batches", type=int, default=d.eval_batches,
                     help="batches per validation (default: %(default)s)")
    run.add_argument("--log-interval", type=int, default=d.log_interval,
                     help="log to the console and log.jsonl every N steps (default: %(default)s)")
    run.add_argument("--device", default=d.device, help="cpu, cuda, cuda:1... (default: %(default)s: "
                     "the process's GPU under torchrun, else cuda if present, else cpu)")
    run.add_argument("--dtype", choices=tuple(AMP_DTYPES), default=d.dtype,
                     help="autocast dtype (default: %(default)s: bfloat16 on GPUs that have it, float16 with "
                     "loss scaling on older ones, float32 on CPUs)")
    run.add_argument("--compile", action="store_true", help="torch.compile the model")
    run.add_argument("--nondeterministic", dest="deterministic", action="store_false",
                     help="attention's backward adds dQ up with atomics (Triton): faster, but gradients vary in "
                     "their last bits run to run, so a resumed run is no longer bitwise the same")
    run.add_argument("--sample-tokens", type=int, default=d.sample_tokens,
                     help="tokens to generate at the end; 0: none (default: %(default)s)")
    run.add_argument("--sample-prompt", default=d.sample_prompt, help="prompt of the final sample "
                     "(default: a line break)")
    run.add_argument("--backend", choices=kernels.BACKENDS, default=argparse.SUPPRESS,
                     help="kernel backend, as `gptfast --backend` (default: $GPTFAST_BACKEND or auto)")
    run.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar: a line every "
                     "--log-interval steps instead (as without a terminal)")
    run.add_argument("--tensorboard", action="store_true", help="also log the scalars of log.jsonl to "
                     "OUT_DIR/tensorboard (needs the tensorboard package)")
    run.add_argument("--ddp-timeout", type=float, default=d.ddp_timeout, metavar="SECONDS",
                     help="under torchrun, how long a collective waits for a stopped or dead peer before the run "
                     "ends with an error (default: %(default)s)")


def _add_file_choice_arguments(p) -> None:
    """--include / --exclude: which files of the input folders are read."""
    p.add_argument("--include", action="append", metavar="GLOB", help="read only the files of input folders "
                   "whose name or path below the folder matches GLOB (repeatable), e.g. '*.txt'")
    p.add_argument("--exclude", action="append", metavar="GLOB", help="leave out the files of input folders "
                   "matching GLOB (repeatable)")


def _load_model(args: argparse.Namespace, device: str):
    """The model (eval mode, on ``device``) and tokenizer named by --checkpoint or --pretrained."""
    if args.checkpoint:
        from .checkpoint import load_for_inference

        model, tokenizer = load_for_inference(args.checkpoint, device, tiktoken_file=args.tiktoken_file)
    else:
        from .pretrained import from_pretrained
        from .tokenizer import GPT2Tokenizer

        model, tokenizer = from_pretrained(args.pretrained, device=device), GPT2Tokenizer(args.tiktoken_file)
    dtype = amp_dtype_for(args.dtype, torch.device(device)) or torch.float32  # as training's autocast picks
    return model.to(dtype), tokenizer


def _print_as_it_arrives(tokenizer, eos: int | None):
    """An ``on_step`` callback printing the first prompt's text as its tokens arrive.

    The whole text is decoded again each step: a byte-pair token can end inside a UTF-8
    character, so text ending in a replacement character waits for the next token.
    """
    tokens, printed = [], 0

    def on_step(step: list[int | None]) -> None:
        nonlocal printed
        if step[0] is not None and step[0] != eos:
            tokens.append(step[0])
            text = tokenizer.decode(tokens)
            if not text.endswith("\ufffd"):
                print(text[printed:], end="", flush=True)
                printed = len(text)

    return on_step


def cmd_generate(args: argparse.Namespace) -> None:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = _load_model(args, device)
    prompts = args.prompt or ["\n"]
    encoded = [tokenizer.encode(p) or [tokenizer.eot_token_id or 0] for p in prompts]
    eos = None if args.ignore_eos else tokenizer.eot_token_id
    # stream() checks every argument at the call, so an error is printed before any text is.
    steps = stream(model, encoded, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                   top_p=args.top_p, seed=args.seed, eos_token_id=eos, use_cache=not args.no_cache,
                   compile=args.compile)
    streaming = len(prompts) == 1
    if streaming:
        print(prompts[0], end="", flush=True)
    start = time.perf_counter()
    outputs = collect(steps, len(encoded), _print_as_it_arrives(tokenizer, eos) if streaming else None)
    seconds = time.perf_counter() - start
    if streaming:
        print()
    else:
        for i, (prompt, new) in enumerate(zip(prompts, outputs)):
            print(f"--- prompt {i} ---\n{prompt}{tokenizer.decode(t for t in new if t != eos)}")
    n = sum(len(new) for new in outputs)
    print(f"[{n} tokens in {seconds:.2f} s: {n / seconds:.1f} tokens/s on {device}, "
          f"{'with' if not args.no_cache else 'without'} the key/value cache]", file=sys.stderr)


def _add_model_arguments(p: argparse.ArgumentParser) -> None:
    """The model to load (see _load_model): its source, device, weights dtype and tokenizer file."""
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", metavar="PATH", help="a training checkpoint (ckpt.pt or its out_dir)")
    source.add_argument("--pretrained", metavar="NAME_OR_DIR", help="a Hugging Face GPT-2 checkpoint "
                        "directory, or gpt2, gpt2-medium, gpt2-large, gpt2-xl (downloaded; needs "
                        "huggingface_hub and a network)")
    p.add_argument("--device", help="cpu, cuda, cuda:1... (default: cuda if present, else cpu)")
    p.add_argument("--dtype", choices=tuple(AMP_DTYPES), default="auto",
                   help="weights dtype (default: %(default)s: bfloat16 on GPUs that have it, float16 on older "
                   "ones, float32 on CPUs)")
    p.add_argument("--tiktoken-file", metavar="PATH", help="local GPT-2 ranks file for offline use "
                   f"(default: ${TIKTOKEN_FILE_ENV}, else tiktoken downloads it)")


def _add_generate_arguments(p: argparse.ArgumentParser) -> None:
    _add_model_arguments(p)
    p.add_argument("--prompt", action="append", metavar="TEXT", help="prompt text; repeat for a batch "
                   "(one prompt streams its text as it arrives; default: a line break)")
    p.add_argument("-n", "--max-new-tokens", type=int, default=100, help="tokens to generate per prompt "
                   "(default: %(default)s)")
    p.add_argument("--temperature", type=float, default=DEFAULT_TEMPERATURE, help="0: greedy (default: "
                   "%(default)s, as gptfast.generate)")
    p.add_argument("--top-k", type=int, help="sample from the k most likely tokens only")
    p.add_argument("--top-p", type=float, help="sample from the smallest set of tokens with this much "
                   "probability only (nucleus sampling)")
    p.add_argument("--seed", type=int, help="random seed for reproducible sampling")
    p.add_argument("--ignore-eos", action="store_true", help="do not stop at the end-of-text token")
    p.add_argument("--no-cache", action="store_true", help="re-run the whole context for every token "
                   "(slow; for comparison)")
    p.add_argument("--compile", action="store_true", help="compile the decode step once (torch.compile; CUDA "
                   "graphs on a GPU) and replay it for every token: faster after its first seconds")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def cmd_eval(args: argparse.Namespace) -> None:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = _load_model(args, device)
    data = TokenData(args.data)
    data_kind, model_kind = data.meta["tokenizer"]["kind"], tokenizer.to_dict()["kind"]
    if data_kind != model_kind:
        raise ValueError(f"{args.data} was prepared with the {data_kind} tokenizer but the model uses "
                         f"{model_kind}: prepare the text with --tokenizer {model_kind}")
    if data.meta["tokenizer"] != tokenizer.to_dict():
        raise ValueError(f"{args.data} numbers its characters differently from the model's vocabulary: a char "
                         "model evaluates only data prepared from the text it was trained on")
    context = model.config.context_length if args.context_length is None else args.context_length
    if not 1 <= context <= model.config.context_length:
        raise ValueError(f"--context-length {context} must be between 1 and the model's {model.config.context_length}")
    loss, n = split_loss(model, data.val if args.split == "val" else data.train, context, args.batch_size,
                         args.max_windows)
    print(f"{args.split} split of {args.data}: {n:,} tokens in windows of {context}: "
          f"loss {loss:.4f}, perplexity {math.exp(loss):.2f}")


def _add_eval_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("data", metavar="DATA", help="a folder made by `gptfast prepare` with the model's tokenizer")
    _add_model_arguments(p)
    p.add_argument("--split", choices=("val", "train"), default="val", help="which split (default: %(default)s)")
    p.add_argument("--context-length", type=int, metavar="T", help="window length (default: the model's context)")
    p.add_argument("--batch-size", type=_positive_int, default=16,
                   help="windows per forward pass (default: %(default)s)")
    p.add_argument("--max-windows", type=_positive_int, metavar="N", help="evaluate the first N windows only")


def cmd_bench(args: argparse.Namespace) -> None:
    # The benchmarks import the package, never the reverse: they run as their own module.
    code = subprocess.call([sys.executable, "-m", "gptfast.bench", *args.bench_args])
    if code:
        raise SystemExit(code)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gptfast", description="GPT-2 training and sampling with hand-written "
                                     "Triton kernels.", epilog='"gptfast COMMAND --help" describes a command.')
    parser.add_argument("--version", action="version", version=f"gptfast {__version__} (distribution gptfast-triton)")
    parser.add_argument("--backend", choices=kernels.BACKENDS, help=BACKEND_HELP)
    sub = parser.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare", help="tokenize text files or folders into a data folder for training",
                          description="Tokenize text into OUT/tokens.bin (uint16 when the vocabulary fits) "
                          "and OUT/meta.json; the last --val-fraction of the tokens is the validation split.")
    prep.add_argument("inputs", nargs="*", metavar="INPUT",
                      help="UTF-8 text files or folders (read recursively); none: the embedded corpus")
    prep.add_argument("--out", required=True, help="data folder to write")
    prep.add_argument("--tokenizer", choices=TOKENIZERS, default="char",
                      help="char: a vocabulary of the text's characters; gpt2: GPT-2 BPE (default: %(default)s)")
    prep.add_argument("--val-fraction", type=float, default=0.1,
                      help="fraction of tokens held out for validation (default: %(default)s)")
    prep.add_argument("--tiktoken-file", metavar="PATH", help="local GPT-2 ranks file for offline use "
                      f"(default: ${TIKTOKEN_FILE_ENV}, else tiktoken downloads it)")
    _add_file_choice_arguments(prep)
    prep.set_defaults(func=cmd_prepare)
    trn = sub.add_parser("train", help="train a GPT (also under torchrun for several GPUs)",
                         description="Train a GPT on prepared data or on text. Ctrl-C stops after the current\n"
                         "step and writes the checkpoint; --resume continues exactly. Under `torchrun\n"
                         "--nproc_per_node N` the same command trains with DistributedDataParallel.",
                         epilog="examples:\n"
                         "  gptfast train                                  # tiny model, embedded corpus\n"
                         "  gptfast train notes.txt --preset mini --max-steps 2000\n"
                         "  gptfast train notes.txt --preset mini --max-steps 2000 --resume\n"
                         "  torchrun --nproc_per_node 8 -m gptfast train data/owt --preset gpt2 "
                         "--tokens-per-step 524288",
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_train_arguments(trn)
    trn.set_defaults(func=cmd_train)
    gen = sub.add_parser("generate", help="generate text from a training checkpoint or pretrained GPT-2",
                         description="Generate text with the key/value cache: greedy (--temperature 0) or "
                         "sampled with temperature, top-k and top-p. Prompts longer than the context keep "
                         "their last tokens.")
    _add_generate_arguments(gen)
    gen.set_defaults(func=cmd_generate)
    ev = sub.add_parser("eval", help="loss and perplexity of a checkpoint or pretrained GPT-2 on prepared data",
                        description="The mean next-token loss (and its exponential, the perplexity) over "
                        "consecutive windows of a data folder's validation (or training) split.")
    _add_eval_arguments(ev)
    ev.set_defaults(func=cmd_eval)
    info = sub.add_parser("info", help="parameter counts and memory per preset, and which backend "
                          "path each operation takes on this machine",
                          description="The versions of torch and Triton, the device, which path (Triton kernel or "
                          "eager PyTorch) each operation takes there for GPT-2-sized inputs, and each preset's "
                          "parameter count and memory for a vocabulary size (GPT-2's unless --vocab-size).")
    info.add_argument("--vocab-size", type=_positive_int, default=GPT2_VOCAB_SIZE, metavar="N",
                      help="vocabulary size for the parameter counts (default: GPT-2's, %(default)s; char-level data "
                      "has one token per distinct character)")
    info.add_argument("--forward", metavar="PRESET", choices=list(PRESETS),
                      help="also run one forward pass of this preset")
    info.set_defaults(func=cmd_info)
    # Every argument after "bench" goes to the benchmark's own parser: this one reads no options.
    bench = sub.add_parser("bench", add_help=False, prefix_chars="+", help="benchmark the kernels, training "
                           "and generation against their baselines and write a report (gptfast bench --help)")
    bench.add_argument("bench_args", nargs="*")
    bench.set_defaults(func=cmd_bench)
    add_lab_parser(sub)
    _accept_backend_after_every_command(sub)
    return parser


def _accept_backend_after_every_command(sub) -> None:
    """--backend after the command as well as before it, for every command that reads options (not bench)."""
    for command in sub.choices.values():
        if "-" in command.prefix_chars and "--backend" not in command._option_string_actions:
            command.add_argument("--backend", choices=kernels.BACKENDS, default=argparse.SUPPRESS, help=BACKEND_HELP)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.backend:
        kernels.set_backend(args.backend)
    try:
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
