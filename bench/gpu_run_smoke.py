"""The GPU run's correctness smoke: every registered op forward and backward against float64, and the
model's training step on the triton backend against the torch one.

The ops come from the op registry (``gptfast.kernels.registry``): each at its ``shapes.odd`` in float32,
float16 and bfloat16 through the kernel lab's check (``gptfast.lab.check``): every output and gradient
at most 2x as far from the float64 reference as PyTorch's eager op in the same dtype, and a rerun
bit-identical. The model check is :func:`model_check`.

The cases run in groups, one process per op and dtype, so that Triton compiles the groups' kernels in
parallel (the compilation, not the checks, takes the time). Each case runs twice: its first call's
seconds over its second's are its compilation. Every finished case is one JSON line in its group's
file; the stage gathers them into smoke.json as they come, so a stopped run keeps what it checked.
The CPU rehearsal runs each op's first odd shape and the model in float32, once, and lists bfloat16 as
skipped (the Triton interpreter truncates bfloat16 where a GPU rounds), in two processes, the ops' and
the model's: there is no compilation to spread, and a process's start (torch's import) takes seconds.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import gpu_run_cache

DTYPES = ("float32", "float16", "bfloat16")
REHEARSAL_DTYPES = ("float32", "bfloat16")  # bfloat16 listed, skipped
MODEL = "model"
BF16_ON_CPU = "skipped: bfloat16 runs on the GPU (the Triton interpreter truncates bfloat16)"
OUT_OF_TIME = "skipped: out of time"
# The model check's bound, in machine epsilons of the step's precision (:func:`epsilon`), relative to
# each tensor's largest entry.
MODEL_EPSILONS = 16


def _without_dq_workspace():
    from gptfast.kernels.flash_attention.launch import without_dq_workspace

    return without_dq_workspace()


# Paths an op's defaults do not take at the smoke's shapes, checked too at its first odd shape in each dtype:
# name: (op, the op's options, what forces the path). Their reruns need not be bit-identical. Attention's
# dK/dV kernel adding dQ up by atomics, the last key block per query block converting it (the backward
# beyond its dQ workspace, deterministic=False): an ordering across programs that only a GPU exercises.
# The prepared Triton cache lacks their kernels: they compile on the GPU, in their op's process.
FORCED_PATHS = {"atomic-dq": ("flash_attention", {"deterministic": False}, _without_dq_workspace)}


@dataclass(frozen=True)
class Case:
    op: str  # a registered op, or MODEL
    shape: tuple[int, ...]  # empty for the model
    dtype: str
    group: str  # one process per group
    path: str = ""  # a key of FORCED_PATHS, or the op's default path

    @property
    def name(self) -> str:
        if self.op == MODEL:
            return f"model step {self.dtype} triton vs torch"
        return f"{self.op} {','.join(map(str, self.shape))} {self.dtype}" + (f" {self.path}" if self.path else "")


def plan(rehearse: bool) -> list[Case]:
    """The smoke's cases, in the order their groups start: those with the most kernels to compile first,
    the model's step (it calls several ops), then the ops by their kernels (``spec.tunables``)."""
    from gptfast.kernels.registry import SPECS

    ops = [MODEL, *sorted(SPECS, key=lambda name: -len(SPECS[name].tunables))]
    shapes = {name: [tuple(s) for s in spec.shapes.odd] for name, spec in SPECS.items()} | {MODEL: [()]}
    if rehearse:
        return ([Case(op, shapes[op][0], dtype, MODEL if op == MODEL else "ops") for op in ops
                 for dtype in REHEARSAL_DTYPES]
                + [Case(op, shapes[op][0], "float32", "ops", path) for path, (op, _, _) in FORCED_PATHS.items()])
    return ([Case(op, shape, dtype, f"{op}-{dtype}") for op in ops for dtype in DTYPES for shape in shapes[op]]
            + [Case(op, shapes[op][0], dtype, f"{op}-{dtype}", path) for path, (op, _, _) in FORCED_PATHS.items()
               for dtype in DTYPES])


def _skip_reason(case: Case, rehearse: bool) -> str | None:
    if rehearse and case.dtype == "bfloat16":
        return BF16_ON_CPU
    if case.op == MODEL:
        return None
    import torch

    from gptfast.lab.check import check_problem

    problem = check_problem(case.op, getattr(torch, case.dtype), _device(rehearse))
    return f"skipped: {problem}" if problem else None


def _device(rehearse: bool):
    import torch

    return torch.device("cuda" if torch.cuda.is_available() and not rehearse else "cpu")


def op_check(case: Case, device) -> dict:
    """The kernel lab's check of one op at one shape and dtype, on its default path or ``case.path``."""
    import torch

    from gptfast.lab.check import check

    _, options, force = FORCED_PATHS.get(case.path, (case.op, {}, contextlib.nullcontext))
    with force():
        comparisons, deterministic = check(case.op, case.shape, getattr(torch, case.dtype), device, options)
    found = [{"tensor": c.tensor, "error": c.error, "eager_error": c.eager_error, "ratio": round(c.ratio, 3),
              "passed": c.passed} for c in comparisons]
    failures = [f"{c['tensor']}: error {c['error']:.3e}, {c['ratio']:.2f}x eager's {c['eager_error']:.3e} (at most 2x)"
                for c in found if not c["passed"]]
    failures += ["a rerun was not bit-identical"] * (not deterministic and not case.path)  # forced: may differ
    return {"comparisons": found, "deterministic": deterministic, "failures": failures}


def model_check(dtype: str, device) -> dict:
    """One training step of a tiny GPT (a layer of 2 heads of 32, 45 tokens of a 97-word vocabulary:
    every kernel the model calls) on each backend, in ``dtype`` (float16 or bfloat16: under autocast).
    The loss and each parameter's gradient of the triton step must lie within :data:`MODEL_EPSILONS`
    epsilons of the precision, relative to the tensor's largest entry, of the torch step's. Measured
    under the interpreter: 3.2 epsilons in float32, 0.65 in float16 (the worst tensors); on a GPU in
    bfloat16 the triton step is within 4% (5 epsilons) of the float32 one (tests/test_model.py). A
    wrong kernel is off by about the entry itself: over a hundred epsilons even in bfloat16."""
    import torch

    import gptfast

    torch.manual_seed(0)
    config = gptfast.GPTConfig(vocab_size=97, context_length=64, n_embd=64, n_head=2, n_layer=1, vocab_multiple=64)
    model = gptfast.GPT(config).to(device)
    idx = torch.randint(0, 97, (1, 45), device=device)
    want, got = (_model_step(model, idx, backend, getattr(torch, dtype)) for backend in ("torch", "triton"))
    eps = epsilon(dtype, device)
    found = []
    for name, tensor in got.items():
        largest = want[name].abs().max().item() or 1.0
        error = (tensor - want[name]).abs().max().item() / largest
        found.append({"tensor": name, "error": error, "epsilons": round(error / eps, 2),
                      "passed": error <= MODEL_EPSILONS * eps})
    failures = [f"{c['tensor']}: {c['epsilons']} epsilons of {dtype} from the torch step's (at most "
                f"{MODEL_EPSILONS})" for c in found if not c["passed"]]
    return {"comparisons": found, "failures": failures}


def epsilon(dtype: str, device) -> float:
    """Machine epsilon of the model step's precision: float32 on a GPU is TF32's where an op's kernels
    multiply float32 in TF32 (``spec.tf32``)."""
    import torch

    from gptfast.kernels.common import TF32_EPS
    from gptfast.kernels.registry import SPECS

    if dtype == "float32" and device.type == "cuda" and any(spec.tf32 for spec in SPECS.values()):
        return TF32_EPS
    return torch.finfo(getattr(torch, dtype)).eps


def _model_step(model, idx, backend: str, dtype) -> dict:
    """The loss and every parameter's gradient (float32) of one step on ``backend``."""
    import torch

    from gptfast import kernels

    model.zero_grad()
    with kernels.use_backend(backend), torch.autocast(idx.device.type, dtype=dtype, enabled=dtype != torch.float32):
        _, loss = model(idx, targets=idx)
    loss.backward()
    return {"loss": loss.detach().float()} | {name: p.grad.float().clone() for name, p in model.named_parameters()}


def run_case(case: Case, device, rehearse: bool = False) -> dict:
    """The case twice (first call, then steady; the rehearsal's once: the interpreter compiles nothing):
    passed, failed (what failed) or error."""
    import torch

    times = []
    try:
        for _ in range(1 if rehearse else 2):
            start = time.perf_counter()
            found = model_check(case.dtype, device) if case.op == MODEL else op_check(case, device)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    except Exception as error:  # noqa: BLE001 - recorded: one broken case must not stop the smoke
        return {"status": "error", "message": f"{type(error).__name__}: {str(error).strip()[:1200]}",
                "traceback": traceback.format_exc()[-2000:]}
    failures = found.pop("failures")
    timing = {"first_s": round(times[0], 3)} | ({"steady_s": round(times[1], 3), "compile_s": round(
        max(0.0, times[0] - times[1]), 3)} if len(times) == 2 else {})
    if failures:
        return {"status": "failed", "message": "\n".join(failures[:6]), **timing, **found}
    return {"status": "passed", **timing, **found}


def run_group(group: str, cases_file: Path, lines: Path, rehearse: bool, deadline: float) -> None:
    """A group's process: its cases in order, one JSON line each, until the deadline."""
    device = _device(rehearse)
    counts = gpu_run_cache.listen()
    for case in (c for c in _read_plan(cases_file) if c.group == group):
        reason = _skip_reason(case, rehearse)
        if reason is None and time.time() > deadline:
            reason = OUT_OF_TIME
        before = counts.as_dict() if counts else {}
        found = {"status": reason} if reason else run_case(case, device, rehearse)
        if counts and not reason:
            found["triton"] = {k: round(v - before[k], 1) for k, v in counts.as_dict().items()}
        seconds = ", then ".join(f"{found[k]:.2f} s" for k in ("first_s", "steady_s") if k in found)
        print(f"smoke {case.name}: {found['status']}" + (f" ({seconds})" if seconds else "")
              + (f"\n  {found['message']}" if "message" in found else ""), flush=True)
        with lines.open("a") as f:
            f.write(json.dumps({"case": case.name, **found}) + "\n")


def _write_plan(cases: list[Case], path: Path) -> None:
    path.write_text(json.dumps([dataclasses.asdict(c) for c in cases]) + "\n")


def _read_plan(path: Path) -> list[Case]:
    return [Case(c["op"], tuple(c["shape"]), c["dtype"], c["group"], c["path"]) for c in json.loads(path.read_text())]


def collect(path: Path, work: Path, final: bool = False) -> dict:
    """smoke.json from the groups' lines: every planned case, those without a line pending (or, ``final``,
    skipped: out of time), and the counts."""
    plan_file = work / "cases.json"
    cases = _read_plan(plan_file) if plan_file.exists() else []  # none: the stage stopped before its plan
    done = {}
    for lines in sorted(work.glob("*.jsonl")):
        for line in lines.read_text().splitlines():
            if line.strip():
                entry = json.loads(line)
                done[entry["case"]] = entry
    missing = {"status": f"{OUT_OF_TIME} (the smoke stage stopped first)" if final else "pending"}
    found = [{"group": c.group, **done.get(c.name, {"case": c.name, **missing})} for c in cases]
    counts = {s: sum(c["status"].startswith(s) for c in found) for s in ("passed", "failed", "error", "skipped")}
    triton = {k: round(sum(c.get("triton", {}).get(k, 0) for c in found), 1) for k in ("hits", "misses", "compile_s")}
    summary = {**counts, "compile_s": round(sum(c.get("compile_s") or 0.0 for c in found), 1), "triton": triton,
               "cases": found}
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(summary, indent=1) + "\n")
    os.replace(partial, path)
    return summary


def _record_crash(group: str, cases: list[Case], lines: Path, code: int) -> None:
    """A group's process died (its output says why): its cases without a line become errors."""
    done = {json.loads(line)["case"] for line in lines.read_text().splitlines()} if lines.exists() else set()
    with lines.open("a") as f:
        for case in cases:
            if case.group == group and case.name not in done:
                f.write(json.dumps({"case": case.name, "status": "error",
                                    "message": f"the {group} group's process exited with {code}"}) + "\n")


def run_stage(path: Path, work: Path, rehearse: bool, deadline: float) -> dict:
    """One process per group (as many at once as there are cores), gathered into ``path`` as they go."""
    work.mkdir(parents=True, exist_ok=True)
    cases = plan(rehearse)
    _write_plan(cases, work / "cases.json")
    groups = list(dict.fromkeys(c.group for c in cases))
    at_once = max(1, min(len(groups), os.cpu_count() or 1))
    waiting, running = list(groups), {}
    while waiting or running:
        while waiting and len(running) < at_once:
            group = waiting.pop(0)
            running[group] = subprocess.Popen([sys.executable, __file__, "--group", group, "--cases",
                                               str(work / "cases.json"), "--lines", str(work / f"{group}.jsonl"),
                                               "--deadline", str(deadline)] + ["--rehearse"] * rehearse)
        time.sleep(0.5)
        if time.time() > deadline:  # the cases in flight are lost, the ones left skipped
            for process in running.values():
                process.kill()
            waiting.clear()
        for group, process in list(running.items()):
            if process.poll() is not None:
                del running[group]
                if process.returncode and time.time() <= deadline:
                    _record_crash(group, cases, work / f"{group}.jsonl", process.returncode)
        collect(path, work)
    summary = collect(path, work, final=True)
    print(f"smoke: {summary['passed']} passed, {summary['failed']} failed, {summary['error']} errors, "
          f"{summary['skipped']} skipped; first calls over steady ones {summary['compile_s']} s", flush=True)
    return {k: v for k, v in summary.items() if k != "cases"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python bench/gpu_run_smoke.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--group", required=True, help="run this group's cases")
    parser.add_argument("--cases", type=Path, required=True, help="the stage's plan (cases.json)")
    parser.add_argument("--lines", type=Path, required=True, help="the JSON-lines file to append each case to")
    parser.add_argument("--deadline", type=float, default=float("inf"), help="epoch seconds: later cases are skipped")
    parser.add_argument("--rehearse", action="store_true")
    args = parser.parse_args(argv)
    run_group(args.group, args.cases, args.lines, args.rehearse, args.deadline)
    return 0


if __name__ == "__main__":
    sys.exit(main())
