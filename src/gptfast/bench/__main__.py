"""``python -m gptfast.bench``: measure, then write results.json, results.md and plots (``--help``)."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import torch

from gptfast.kernels.backend import TRITON_INTERPRET

from . import report
from .harness import REP_MS, WARMUP_MS
from .kernel_bench import SIZE_MODES

README = Path("README.md")  # the checkout's, run from the repository root


def build_parser(prog: str = "python -m gptfast.bench") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="Benchmark the kernels, training and "
                                     "generation against their baselines and write a report.")
    parser.add_argument("--group", action="append", choices=report.GROUPS,
                        help="run this group only (repeat for several; default: all)")
    parser.add_argument("--sizes", choices=SIZE_MODES, help="full (GPU sizes), small (CPU sizes) or "
                        "headline (each kernel's GPT-2 size only); default: full on a GPU, else small")
    parser.add_argument("--provider", action="append", choices=report.PROVIDERS,
                        help="measure this provider only (repeatable; default: all)")
    parser.add_argument("--results-root", type=Path, default=report.RESULTS_ROOT,
                        help="where result folders <date>-<device> go and are looked up (default: bench/results)")
    parser.add_argument("--out", type=Path, help="output folder (default: <results-root>/<date>-<device>)")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    parser.add_argument("--warmup-ms", type=float, default=WARMUP_MS,
                        help="do_bench's warm-up per kernel case (ms); a training step's is 20 times as long")
    parser.add_argument("--rep-ms", type=float, default=REP_MS, help="do_bench's timed repeats per kernel case "
                        "(ms); a training step's are 20 times, a generation's 10 times as long")
    parser.add_argument("--budget-s", type=float, help="skip the cases left after this many seconds")
    parser.add_argument("--update-readme", action="store_true",
                        help="after the run, regenerate the README's results table from it")
    parser.add_argument("--readme-from", type=Path, metavar="RESULTS_JSON", nargs="?", const="latest",
                        help="measure nothing: regenerate the README's table from this results.json "
                        "(default: the latest GPU one under bench/results) and exit")
    parser.add_argument("--render", type=Path, metavar="RESULTS_JSON",
                        help="measure nothing: rewrite results.md and the plots beside this results.json "
                        "(say, of a run stopped by a time limit) and exit")
    return parser


def main(argv: list[str] | None = None, prog: str = "python -m gptfast.bench") -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(prog).parse_args(argv)
    if args.readme_from is not None:
        latest = str(args.readme_from) == "latest"
        source = report.latest_results(args.results_root) if latest else args.readme_from
        if source is None or not Path(source).exists():
            print(f"no results to put in the README (looked for "
                  f"{args.results_root / '*/results.json' if latest else source})", file=sys.stderr)
            return 1
        report.update_readme(README, Path(source))
        print(f"README.md: results table regenerated from {source}")
        return 0

    if args.render is not None:
        for path in report.write(json.loads(args.render.read_text()), args.render.parent,
                                 plots=not args.no_plots):
            print(f"wrote {path}")
        return 0

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    settings = report.Settings(groups=tuple(args.group or report.GROUPS),
                               sizes=args.sizes or ("full" if device.type == "cuda" else "small"),
                               providers=tuple(args.provider or ()), warmup_ms=args.warmup_ms,
                               rep_ms=args.rep_ms, budget_s=args.budget_s)
    if device.type != "cuda":
        print("no GPU: " + ("the Triton kernels run under the interpreter, so their times measure "
                            "the interpreter, not the kernels" if TRITON_INTERPRET else
                            "the Triton rows are unavailable (TRITON_INTERPRET=1 runs them under the "
                            "interpreter)") + "; CPU numbers only show that the code works")
    out_dir = args.out or report.results_dir(device, args.results_root)
    results = report.run(settings, device, command=" ".join([prog, *map(shlex.quote, argv)]), out_dir=out_dir)
    for path in report.write(results, out_dir, plots=not args.no_plots):
        print(f"wrote {path}")
    if args.update_readme:
        report.update_readme(README, out_dir / "results.json")
        print("README.md: results table regenerated")
    print()
    print((out_dir / "results.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
