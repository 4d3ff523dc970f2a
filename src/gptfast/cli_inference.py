"""``gptfast generate`` and ``gptfast eval``: the model both load (their shared options, declared
once on :class:`ModelSource`) and the two commands."""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass

import torch

from .config import TrainConfig, tiktoken_file_option
from .data import TokenData
from .distributed import resolve_device
from .evaluate import split_loss
from .generation import DEFAULT_TEMPERATURE, collect, stream
from .hellaswag import read_examples, score
from .options import add_arguments, argparse_type, declarations, from_arguments, option, positive_int
from .precision import amp_dtype_for, dtype_option


@dataclass
class ModelSource:
    """The model generate and eval load (:func:`_load_model`): --checkpoint or --pretrained (one of
    them, required), the device, the weights' dtype and the tokenizer file."""

    checkpoint: str | None = option(help="a training checkpoint (ckpt.pt or its out_dir)", group="model",
                                    metavar="PATH")
    pretrained: str | None = option(help="a Hugging Face GPT-2 checkpoint directory, or gpt2, gpt2-medium, "
                                    "gpt2-large, gpt2-xl (downloaded; needs huggingface_hub and a network)",
                                    group="model", metavar="NAME_OR_DIR")
    device: str | None = option(help="cpu, cuda, cuda:1...", group="model", default_help="cuda if present, else cpu")
    dtype: str = dtype_option("weights", "float16", group="model")
    tiktoken_file: str | None = tiktoken_file_option(group="model")


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """ModelSource's options: --checkpoint and --pretrained exclusive, one of them required."""
    add_arguments(p.add_mutually_exclusive_group(required=True), ModelSource, names=("checkpoint", "pretrained"))
    add_arguments(p, ModelSource, names=("device", "dtype", "tiktoken_file"))


def _load_model(args: argparse.Namespace):
    """The model (eval mode, on --device) and tokenizer named by --checkpoint or --pretrained, and the device."""
    source = ModelSource(**from_arguments(ModelSource, args))
    device = resolve_device(source.device or "auto", option="--device")
    if source.checkpoint:
        from .checkpoint import load_for_inference

        model, tokenizer = load_for_inference(source.checkpoint, device, tiktoken_file=source.tiktoken_file)
    else:
        from .pretrained import from_pretrained
        from .tokenizer import GPT2Tokenizer

        model, tokenizer = from_pretrained(source.pretrained, device=device), GPT2Tokenizer(source.tiktoken_file)
    dtype = amp_dtype_for(source.dtype, device) or torch.float32  # as training's autocast picks
    return model.to(dtype), tokenizer, device


def print_as_it_arrives(tokenizer, eos: int | None):
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
    model, tokenizer, device = _load_model(args)
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
    outputs = collect(steps, len(encoded), print_as_it_arrives(tokenizer, eos) if streaming else None)
    seconds = time.perf_counter() - start
    if streaming:
        print()
    else:
        for i, (prompt, new) in enumerate(zip(prompts, outputs)):
            print(f"--- prompt {i} ---\n{prompt}{tokenizer.decode(t for t in new if t != eos)}")
    n = sum(len(new) for new in outputs)
    print(f"[{n} tokens in {seconds:.2f} s: {n / seconds:.1f} tokens/s on {device}, "
          f"{'with' if not args.no_cache else 'without'} the key/value cache]", file=sys.stderr)


def add_generate_parser(sub) -> None:
    p = sub.add_parser("generate", help="generate text from a training checkpoint or pretrained GPT-2",
                       description="Generate text with the key/value cache: greedy (--temperature 0) or "
                       "sampled with temperature, top-k and top-p. Prompts longer than the context keep "
                       "their last tokens.")
    p.set_defaults(func=cmd_generate)
    add_model_arguments(p)
    p.add_argument("--prompt", action="append", metavar="TEXT", help="prompt text; repeat for a batch "
                   "(one prompt streams its text as it arrives; default: a line break)")
    p.add_argument("-n", "--max-new-tokens", type=int, default=100, help="tokens to generate per prompt "
                   "(default: %(default)s)")
    p.add_argument("--temperature", type=float, default=DEFAULT_TEMPERATURE, help="0: greedy (default: "
                   "%(default)s, as gptfast.generate)")
    p.add_argument("--top-k", type=int, help="sample from the k most likely tokens only")
    p.add_argument("--top-p", type=float, help="sample from the smallest set of tokens with this much "
                   "probability only (nucleus sampling)")
    p.add_argument("--seed", type=argparse_type(declarations(TrainConfig)["seed"]),  # a seed, as train takes
                   help="random seed for reproducible sampling")
    p.add_argument("--ignore-eos", action="store_true", help="do not stop at the end-of-text token")
    p.add_argument("--no-cache", action="store_true", help="re-run the whole context for every token "
                   "(slow; for comparison)")
    p.add_argument("--compile", action="store_true", help="compile the decode step once (torch.compile; CUDA "
                   "graphs on a GPU) and replay it for every token: faster after its first seconds")


def cmd_eval(args: argparse.Namespace) -> None:
    if args.data is None and args.hellaswag is None:
        raise ValueError("nothing to evaluate: name a prepared data folder (DATA), --hellaswag FILE, or both")
    model, tokenizer, device = _load_model(args)
    if args.data is not None:
        _eval_loss(args, model, tokenizer)
    if args.hellaswag is not None:
        examples = read_examples(args.hellaswag, tokenizer, model.config.context_length)
        result = score(model, examples, args.batch_size)
        print(f"{args.hellaswag}: {result.examples:,} examples: acc {result.acc:.4f} (summed ending loss), "
              f"acc_norm {result.acc_norm:.4f} (mean ending loss per token)")


def _eval_loss(args: argparse.Namespace, model, tokenizer) -> None:
    """The loss and perplexity over a split of the data folder ``args.data``."""
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


def add_eval_parser(sub) -> None:
    p = sub.add_parser("eval", help="loss and perplexity of a checkpoint or pretrained GPT-2 on prepared data, "
                       "and HellaSwag accuracy",
                       description="The mean next-token loss (and its exponential, the perplexity) over "
                       "consecutive windows of a data folder's validation (or training) split; with --hellaswag, "
                       "the accuracy on a multiple-choice set in HellaSwag's JSONL format.")
    p.set_defaults(func=cmd_eval)
    p.add_argument("data", metavar="DATA", nargs="?", help="a folder made by `gptfast prepare` with the model's "
                   "tokenizer (or of llm.c .bin shards)")
    add_model_arguments(p)
    p.add_argument("--split", choices=("val", "train"), default="val", help="which split (default: %(default)s)")
    p.add_argument("--context-length", type=int, metavar="T", help="window length (default: the model's context)")
    p.add_argument("--batch-size", type=positive_int, default=16,
                   help="windows (or --hellaswag examples, all their endings) per forward pass (default: %(default)s)")
    p.add_argument("--max-windows", type=positive_int, metavar="N", help="evaluate the first N windows only")
    p.add_argument("--hellaswag", metavar="FILE", help="also (or only) score a HellaSwag-format JSONL file: acc by "
                   "each ending's summed loss, acc_norm by its mean loss per token")
