"""The GPU correctness smoke of ``bench/gpu.sh``: every op forward and backward at two or three shapes per
dtype against its float64 (or float32) reference, and the model's triton-vs-torch loss and gradients.

Each case calls one of the test suite's own tests (``tests/test_*.py``, run from the repository root)
with chosen parameters, so the references and tolerances are the suite's; it is not the suite. Cases
run in groups, one process per group, so that Triton compiles the groups' kernels in parallel (the
compilation, not the checks, takes the time). Each case runs twice: its first call's seconds over its
second's are its compilation. Every finished case is one JSON line in the group's file; the stage
gathers them into smoke.json as they come, so a stopped run keeps what it checked.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

TESTS = Path("tests")  # the checkout's, run from the repository root
BF16_ON_CPU = "skipped: bfloat16 runs on the GPU (the Triton interpreter truncates bfloat16)"
OUT_OF_TIME = "skipped: out of time"


@dataclass(frozen=True)
class Case:
    group: str  # one process per group
    name: str
    test: str  # "module::function" in tests/
    kwargs: dict = field(default_factory=dict)  # dtypes by name: "float32", "float16", "bfloat16"
    gpu_only: bool = False  # bfloat16: the interpreter truncates where a GPU rounds


def _dtype_cases(group: str, test: str, label: str, values: list[dict]) -> list[Case]:
    cases = []
    for dtype in ("float32", "float16", "bfloat16"):
        for kwargs in values:
            shape = " ".join(f"{k}={v}" for k, v in kwargs.items())
            cases.append(Case(group, f"{label} {shape} {dtype}", test, {**kwargs, "dtype": dtype},
                              gpu_only=dtype == "bfloat16"))
    return cases


def _attention(dtype: str, shapes: list[tuple]) -> list[Case]:
    keys = ("batch", "heads", "q_len", "k_len", "head_dim", "causal")
    return [Case(f"attention-{dtype}", "flash_attention " + " ".join(f"{k}={v}" for k, v in zip(keys, shape))
                 + f" {dtype}", "test_flash_attention::test_matches_float64_reference",
                 {**dict(zip(keys, shape)), "dtype": dtype}) for shape in shapes]


def _add_layer_norm() -> list[Case]:
    """x + branch in one dtype (None: y in the sum's dtype)."""
    return [Case("layer_norm", f"add_layer_norm rows={rows} n={n} {dtype}", "test_add_layer_norm::test_matches_float64",
                 {"rows": rows, "n": n, "dtypes": (dtype, dtype, None), "interpreter_bf16_rounding": None},
                 gpu_only=dtype == "bfloat16")
            for rows, n in ((33, 768), (4, 1000)) for dtype in ("float32", "float16", "bfloat16")]


def _linear_cross_entropy() -> list[Case]:
    """Two of the test's cases: several chunks with a partial last one and padded classes; z-loss and a sum."""
    names = ("rows", "d", "vocab", "classes", "smoothing", "z", "reduction", "chunk")
    cases = ((300, 24, 131, 120, 0.0, 0.0, "mean", 64 * 131 * 4), (65, 12, 200, 199, 0.0, 1e-2, "sum", 64 * 200 * 4))
    return [Case("cross_entropy", f"linear_cross_entropy rows={case[0]} vocab={case[2]} float32",
                 "test_linear_cross_entropy::test_matches_float64", {"backend": "triton", **dict(zip(names, case))})
            for case in cases]


# Row ops at GPT-2's widths and an odd one; attention as the model calls it, causal or not, fewer queries
# than keys; the model's training step under float16 autocast and in float32, on both backends.
CASES: tuple[Case, ...] = (
    *_dtype_cases("layer_norm", "test_layer_norm::test_matches_reference", "layer_norm",
                  [{"n": 768}, {"n": 1000}, {"n": 4096}]),
    *_add_layer_norm(),
    *_dtype_cases("bias_gelu", "test_bias_gelu::test_matches_reference", "bias_gelu",
                  [{"n": 3072, "approximate": "tanh"}, {"n": 1000, "approximate": "none"}]),
    *_dtype_cases("cross_entropy", "test_cross_entropy::test_matches_reference", "cross_entropy",
                  [{"classes": 1000}, {"classes": 4097}, {"classes": 50257}]),
    *_linear_cross_entropy(),
    *_attention("float32", [(1, 2, 63, 63, 80, False), (1, 1, 65, 65, 128, True), (1, 1, 40, 57, 32, True)]),
    *_attention("float16", [(2, 1, 17, 17, 32, True), (1, 1, 200, 200, 64, True), (1, 2, 1, 65, 64, True)]),
    *[Case("attention-bfloat16", f"flash_attention 2x3x333 head_dim={d} bfloat16",
           "test_flash_attention::test_bfloat16_matches_float64_reference", {"head_dim": d}, gpu_only=True)
      for d in (64, 128)],
    Case("model", "model step float16 autocast triton vs torch",
         "test_model::test_autocast_training_step_triton_matches_torch"),
    Case("model", "model step float32 triton vs torch",
         "test_flash_attention::test_model_training_step_triton_matches_torch"),
)
# The slowest to compile first, so that their processes start at once.
GROUPS = ("attention-float16", "attention-float32", "attention-bfloat16", "model", "cross_entropy", "layer_norm",
          "bias_gelu")


def selected(rehearse: bool) -> list[Case]:
    """Every case on the GPU; in the CPU rehearsal each group's first (bfloat16 ones then skipped)."""
    if not rehearse:
        return list(CASES)
    firsts = {c.group: c for c in reversed(CASES)}
    return [c for c in CASES if firsts[c.group] is c]


def _skip_reason(case: Case, rehearse: bool) -> str | None:
    return BF16_ON_CPU if rehearse and case.gpu_only else None


def _resolve(value):
    import torch

    if isinstance(value, str) and value in ("float32", "float16", "bfloat16"):
        return getattr(torch, value)
    if isinstance(value, tuple):
        return tuple(_resolve(v) for v in value)
    return value


def _test_function(test: str):
    if not TESTS.is_dir():
        raise FileNotFoundError(f"the smoke calls the test suite's checks: no {TESTS}/ here (run from the checkout)")
    if str(TESTS.resolve()) not in sys.path:
        sys.path.insert(0, str(TESTS.resolve()))
    module, function = test.split("::")
    return getattr(importlib.import_module(module), function)


def run_case(case: Case) -> dict:
    """The case twice (first call, then steady); passed, failed (its assertion's first lines) or error."""
    fn = _test_function(case.test)
    kwargs = {k: _resolve(v) for k, v in case.kwargs.items()}
    times = []
    try:
        for _ in range(2):
            start = time.perf_counter()
            fn(**kwargs)
            _synchronize()
            times.append(time.perf_counter() - start)
    except AssertionError as error:
        return {"status": "failed", "message": "\n".join(str(error).splitlines()[:6])[:1500], "first_s": None}
    except Exception as error:  # noqa: BLE001 - recorded: one broken case must not stop the smoke
        return {"status": "error", "message": f"{type(error).__name__}: {str(error).strip()[:1200]}",
                "traceback": traceback.format_exc()[-2000:]}
    return {"status": "passed", "first_s": round(times[0], 3), "steady_s": round(times[1], 3),
            "compile_s": round(max(0.0, times[0] - times[1]), 3)}


def _synchronize() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def run_group(group: str, lines: Path, rehearse: bool, deadline: float) -> None:
    """A group's process: its cases in order, one JSON line each, until the deadline."""
    import torch

    from .triton_cache import listen

    torch.set_default_device("cuda" if torch.cuda.is_available() and not rehearse else "cpu")  # as the tests do
    counts = listen()
    for case in (c for c in selected(rehearse) if c.group == group):
        reason = _skip_reason(case, rehearse)
        if reason is None and time.time() > deadline:
            reason = OUT_OF_TIME
        before = counts.as_dict() if counts else {}
        found = {"status": reason} if reason else run_case(case)
        if counts and not reason:
            found["triton"] = {k: round(v - before[k], 1) for k, v in counts.as_dict().items()}
        print(f"smoke {case.name}: {found['status']}" + (f" ({found['first_s']:.1f} s, then {found['steady_s']:.2f} s)"
              if found.get("steady_s") is not None else "") + (f"\n  {found['message']}" if "message" in found else ""),
              flush=True)
        with lines.open("a") as f:
            f.write(json.dumps({"case": case.name, **found}) + "\n")


def collect(path: Path, work: Path, rehearse: bool, final: bool = False) -> dict:
    """smoke.json from the groups' lines: every case, those without a line pending (or, ``final``,
    skipped: out of time), and the counts."""
    done = {}
    for lines in sorted(work.glob("*.jsonl")):
        for line in lines.read_text().splitlines():
            if line.strip():
                entry = json.loads(line)
                done[entry["case"]] = entry
    missing = {"status": f"{OUT_OF_TIME} (the smoke stage stopped first)" if final else "pending"}
    cases = [{"group": c.group, **done.get(c.name, {"case": c.name, **missing})} for c in selected(rehearse)]
    counts = {s: sum(c["status"].startswith(s) for c in cases) for s in ("passed", "failed", "error", "skipped")}
    triton = {k: round(sum(c.get("triton", {}).get(k, 0) for c in cases), 1) for k in ("hits", "misses", "compile_s")}
    summary = {**counts, "compile_s": round(sum(c.get("compile_s") or 0.0 for c in cases), 1), "triton": triton,
               "cases": cases}
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(summary, indent=1) + "\n")
    os.replace(partial, path)
    return summary


def _record_crash(group: str, lines: Path, code: int, rehearse: bool) -> None:
    """A group's process died (its output says why): its cases without a line become errors."""
    done = {json.loads(line)["case"] for line in lines.read_text().splitlines()} if lines.exists() else set()
    with lines.open("a") as f:
        for case in selected(rehearse):
            if case.group == group and case.name not in done:
                f.write(json.dumps({"case": case.name, "status": "error",
                                    "message": f"the {group} group's process exited with {code}"}) + "\n")


def run_stage(path: Path, work: Path, rehearse: bool, deadline: float) -> dict:
    """One process per group (as many at once as there are cores), gathered into ``path`` as they go."""
    work.mkdir(parents=True, exist_ok=True)
    groups = [g for g in GROUPS if any(c.group == g for c in selected(rehearse))]
    at_once = max(1, min(len(groups), os.cpu_count() or 1))
    waiting, running = list(groups), {}
    while waiting or running:
        while waiting and len(running) < at_once:
            group = waiting.pop(0)
            running[group] = subprocess.Popen([sys.executable, "-m", "gptfast.bench.gpu_smoke", "--group", group,
                                               "--lines", str(work / f"{group}.jsonl"), "--deadline", str(deadline)]
                                              + ["--rehearse"] * rehearse)
        time.sleep(0.5)
        if time.time() > deadline:  # the cases in flight are lost, the ones left skipped
            for process in running.values():
                process.kill()
            waiting.clear()
        for group, process in list(running.items()):
            if process.poll() is not None:
                del running[group]
                if process.returncode and time.time() <= deadline:
                    _record_crash(group, work / f"{group}.jsonl", process.returncode, rehearse)
        collect(path, work, rehearse)
    summary = collect(path, work, rehearse, final=True)
    print(f"smoke: {summary['passed']} passed, {summary['failed']} failed, {summary['error']} errors, "
          f"{summary['skipped']} skipped; first calls over steady ones {summary['compile_s']} s", flush=True)
    return {k: v for k, v in summary.items() if k != "cases"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gptfast.bench.gpu_smoke", description=__doc__.split("\n\n")[0])
    parser.add_argument("--group", choices=GROUPS, required=True)
    parser.add_argument("--lines", type=Path, required=True, help="the JSON-lines file to append each case to")
    parser.add_argument("--deadline", type=float, default=float("inf"), help="epoch seconds: later cases are skipped")
    parser.add_argument("--rehearse", action="store_true")
    args = parser.parse_args(argv)
    run_group(args.group, args.lines, args.rehearse, args.deadline)
    return 0


if __name__ == "__main__":
    sys.exit(main())
