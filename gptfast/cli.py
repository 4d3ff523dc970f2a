"""The ``gptfast`` command line: ``gptfast info`` (more subcommands: ``gptfast --help``)."""

from __future__ import annotations

import argparse
import sys

import torch

import kernels
from kernels.backend import HAS_TRITON, TRITON_INTERPRET

from .model import GPT, PRESETS, GPTConfig


def _preset_table() -> str:
    rows = [f"{'preset':<12} {'layers':>6} {'heads':>5} {'n_embd':>6} {'context':>7} {'params':>15} "
            f"{'fp32 weights':>12} {'train mem*':>10}"]
    for name in PRESETS:
        config = GPTConfig.from_preset(name)
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
    routes = [kernels.explain("layer_norm", x, w, w), kernels.explain("bias_gelu", h, b),
              kernels.explain("flash_attention", q, q, q)]
    return "\n".join(f"  {r}" for r in routes)


def cmd_info(args: argparse.Namespace) -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"torch {torch.__version__}, triton {'installed' if HAS_TRITON else 'not installed'}"
          f"{' (interpreter)' if TRITON_INTERPRET else ''}, device {device}"
          + (f" ({torch.cuda.get_device_name()})" if device == "cuda" else ""))
    print(f"backend: {kernels.get_backend()}; paths for bf16 GPT-2-sized inputs on {device}:")
    print(_backend_report(device))
    print()
    print(_preset_table())
    if args.forward:
        config = GPTConfig.from_preset(args.forward)
        model = GPT(config).to(device).eval()
        idx, targets = torch.randint(0, config.vocab_size, (2, 2, config.context_length), device=device)
        with torch.no_grad():
            logits, loss = model(idx, targets)
        print(f"\nforward pass of {args.forward!r} on {device}: logits {tuple(logits.shape)}, "
              f"loss {loss.item():.3f} (untrained: ln(vocab) = {torch.log(torch.tensor(config.vocab_size)):.3f})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gptfast", description=__doc__)
    parser.add_argument("--backend", choices=kernels.BACKENDS, help="kernel backend (default: "
                        "$GPTFAST_BACKEND or auto)")
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="parameter counts and memory per preset, and which backend "
                          "path each operation takes on this machine")
    info.add_argument("--forward", metavar="PRESET", choices=list(PRESETS),
                      help="also run one forward pass of this preset")
    info.set_defaults(func=cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.backend:
        kernels.set_backend(args.backend)
    args.func(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
