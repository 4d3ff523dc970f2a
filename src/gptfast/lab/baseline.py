"""The committed baseline of main-loop lengths (``tests/lab_baseline.json``), per Triton version.

Each entry is ``main_loop_instructions`` of one kernel at one configuration: every op at its GPT-2
shape in bf16, on sm_80 and sm_90, with every input in bf16 and (an entry ending in "training") with
the inputs as training passes them (``OpSpec.training_inputs``). A change that makes any of them more
than 3% longer, or adds a kernel, configuration or op the baseline lacks, fails ``tests/test_lab.py``
until the baseline is regenerated (``python -m gptfast.lab baseline --write``, with each Triton
version it records) and the growth is reviewed with it.
"""

from __future__ import annotations

import json
from pathlib import Path

from gptfast.kernels.registry import SPECS

from .analysis import Request, inspect_many, triton_version
from .targets import ARCHITECTURES

BASELINE_FILE = Path(__file__).resolve().parents[3] / "tests" / "lab_baseline.json"  # src/gptfast/lab/ in a checkout
BASELINE_ARCHS = (80, 90)
TOLERANCE = 0.03


def baseline_requests() -> list[Request]:
    return [Request(op, op.shapes.default, "bf16", ARCHITECTURES[arch], {}, {}, training=training)
            for op in SPECS.values() for arch in BASELINE_ARCHS
            for training in (False, True)[:1 + (op.training_inputs is not None)]]


def entry_key(report: dict, kernel: dict) -> str:
    config = ",".join(f"{k}={v}" for k, v in kernel["config"].items() if v is not None)
    return f"{report['op']} {report['arch']} {kernel['name']} {config}" + (
        " training" if report["inputs"] == "training" else "")


def current(reports: list[dict] | None = None) -> dict[str, int]:
    """{entry: main_loop_instructions} of the baseline's requests, compiled now."""
    reports = reports if reports is not None else [r for r, _ in inspect_many(baseline_requests())]
    return {entry_key(r, k): k["main_loop_instructions"] for r in reports for k in r["kernels"]}


def load(path: Path = BASELINE_FILE) -> dict[str, dict[str, int]]:
    return json.loads(path.read_text()) if path.exists() else {}


def regressions(now: dict[str, int], recorded: dict[str, int], tolerance: float = TOLERANCE) -> list[str]:
    """Entries more than ``tolerance`` longer than recorded, or not recorded at all: one line per op
    that ``recorded`` lacks altogether (added since), one per entry otherwise."""
    problems = []
    recorded_ops = {key.split()[0] for key in recorded}
    for op in sorted({key.split()[0] for key in now} - recorded_ops):
        problems.append(f"{op}: no entries for Triton {triton_version()} in {BASELINE_FILE.name}; record them with "
                        f"`python -m gptfast.lab baseline --write` under Triton {triton_version()}")
    for key, n in sorted(now.items()):
        if key.split()[0] not in recorded_ops:
            continue
        if key not in recorded:
            problems.append(f"{key}: {n} instructions, not in the baseline")
        elif n > recorded[key] * (1 + tolerance):
            problems.append(f"{key}: {n} instructions, {n / recorded[key] - 1:+.1%} over the baseline's "
                            f"{recorded[key]}")
    return problems


def write(path: Path = BASELINE_FILE) -> dict[str, int]:
    """Record the current lengths for this Triton version (other versions' entries are kept)."""
    everything = load(path)
    everything[triton_version()] = current()
    path.write_text(json.dumps(everything, indent=1, sort_keys=True) + "\n")
    return everything[triton_version()]
