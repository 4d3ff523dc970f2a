"""``bash bench/gpu.sh``: every headline figure from one command on a GPU rented by the minute, within 510 s.

The run is planned to fit a 540 s job and to leave few, small files, easy to copy back (at most 8 in
$OUT, 16 MiB each, two folders deep at most). So it runs :data:`STAGES` in order, each with its own
budget, each as a subprocess that is killed at its limit, so that a hang costs that stage alone. Every stage
writes into $OUT as it goes (a killed run keeps what it measured); the cases a stage could not reach
are recorded as "skipped: out of time"; each stage's compilation (Triton's cache hits and misses and
compile seconds, the first calls' seconds over the steady ones) is measured in ``stages.json``.

$OUT at the end (:data:`OUTPUTS`): ``gpu.log`` (what the run printed, written by gpu.sh),
``stages.json``, ``smoke.json``, ``results.json`` and ``results.md`` (the benchmark report),
``tuned.tar.gz`` (the configuration tables ``gptfast lab tune`` wrote) and ``report.tar.gz`` (the
results folder to commit under bench/results/: all of these plus one PNG per kernel).

``--rehearse`` runs the same stages on a CPU at tiny sizes, the kernels under the Triton interpreter.

A script of the checkout, not of the installed package (``python bench/gpu_run.py``, as gpu.sh runs it):
it measures through the installed ``gptfast.bench`` (the report and the per-op benchmarks), runs the
correctness smoke (``gpu_run_smoke.py``) and counts Triton's compilations (``gpu_run_cache.py``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import gpu_run_cache
import gpu_run_smoke

TOTAL_BUDGET_S = 510  # of a 540 s job; the rest is slack for the install and packing
# What the run may leave in $OUT.
MAX_FILES, MAX_FILE_BYTES, MAX_DEPTH = 8, 16 * 2**20, 2
OUTPUTS = ("gpu.log", "stages.json", "smoke.json", "results.json", "results.md", "tuned.tar.gz", "report.tar.gz")
KILL_GRACE_S = 3.0  # between SIGTERM and SIGKILL of a stage at its limit
MIN_STAGE_S = 5.0  # a stage given less than this is skipped: out of time


@dataclass
class Context:
    """What a stage's process knows: where to write, what to measure, and its deadline (epoch s)."""

    out: Path
    work: Path  # scratch outside $OUT (stage summaries, the smoke's workers' lines, packing)
    rehearse: bool
    deadline: float

    def left(self) -> float:
        return self.deadline - time.time()

    @property
    def device(self):
        import torch

        return torch.device("cuda" if torch.cuda.is_available() and not self.rehearse else "cpu")


@dataclass(frozen=True)
class Stage:
    name: str
    budget_s: float  # on the GPU
    rehearsal_s: float  # on a CPU, at tiny sizes
    run: Callable[[Context], dict]  # in the stage's own process: its summary for stages.json
    what: str
    finish: Callable[[Context, str], None] | None = None  # in the driver, after the process ends

    def budget(self, rehearse: bool) -> float:
        return self.rehearsal_s if rehearse else self.budget_s


# ---------------------------------------------------------------- the stages


def _versions(ctx: Context) -> dict:
    from gptfast.bench import report

    found = {"versions": report.versions(), "device": report.device_info(ctx.device),
             "triton_cache": gpu_run_cache.fingerprint()}
    smi = shutil.which("nvidia-smi")
    if smi:
        query = "name,memory.total,clocks.sm,clocks.max.sm,temperature.gpu,power.draw,power.limit,driver_version"
        found["nvidia_smi"] = subprocess.run([smi, f"--query-gpu={query}", "--format=csv"], capture_output=True,
                                             text=True, timeout=20).stdout.strip()
        print(found["nvidia_smi"])
    print(json.dumps({k: found[k] for k in ("versions", "device")}, indent=1))
    return found


def _settings(ctx: Context, **changes):
    from gptfast.bench import report

    timing = dict(warmup_ms=1.0, rep_ms=5.0) if ctx.rehearse else dict(warmup_ms=10.0, rep_ms=40.0)
    return report.Settings(sizes="small" if ctx.rehearse else "full", **{**timing, **changes})


def _load_results(ctx: Context) -> dict:
    """The run's results.json; measured afresh (the ceilings, the header) if an earlier stage left none."""
    from gptfast.bench import report

    path = ctx.out / "results.json"
    if path.exists():
        return json.loads(path.read_text())
    results = report.begin(_settings(ctx), ctx.device, command="bash bench/gpu.sh" + " --rehearse" * ctx.rehearse)
    results["lab_target"] = _lab_target(ctx)
    report.write(results, ctx.out, plots=False)
    return results


def _lab_target(ctx: Context) -> dict | None:
    """The lab's target this GPU is (``gptfast.lab.targets.target_for_device``), with the numbers its static
    estimates use, so that `gptfast lab inspect --target NAME` sits beside what this run measures; None
    on a CPU."""
    if ctx.device.type != "cuda":
        return None
    import torch

    from gptfast.lab.targets import target_for_device

    props = torch.cuda.get_device_properties(ctx.device)
    target = target_for_device(props.name, (props.major, props.minor), props.multi_processor_count,
                               props.total_memory)
    return {"name": target.name, "part": target.part, "arch": f"sm_{target.arch}", "sm_count": target.sm_count,
            "clock_hz": target.clock_hz, "bandwidth": target.bandwidth, "bandwidth_source": target.bandwidth_source,
            "tensor_core_flops": target.bf16_dense_flops}


def _ceilings(ctx: Context) -> dict:
    results = _load_results(ctx)
    ceilings, target = results["ceilings"], results.get("lab_target")
    print(f"ceilings: copy {ceilings['copy_gbps']:,.0f} GB/s, {ceilings['matmul_dtype']} matmul "
          f"{ceilings['matmul_tflops']:,.1f} TFLOP/s; the lab's target: "
          + (f"{target['name']} ({target['bandwidth'] / 1e9:,.0f} GB/s {target['bandwidth_source']}, "
             f"{target['tensor_core_flops'] / 1e12:,.0f} TFLOP/s)" if target else "none (no GPU)"))
    return {"ceilings": ceilings, "lab_target": target}


def _train_tasks(ctx: Context, providers: tuple[str, ...]) -> list:
    """The training steps of ``providers``, in that order."""
    from gptfast.bench import report

    found = report.tasks(_settings(ctx, groups=("train",), providers=providers), ctx.device)
    return sorted(found, key=lambda task: providers.index(task.provider))


def _generate_tasks(ctx: Context) -> list:
    """With the key/value cache first: the figure that matters, if the budget cuts the rest."""
    from gptfast.bench import report

    found = report.tasks(_settings(ctx, groups=("generate",)), ctx.device)
    return sorted(found, key=lambda task: task.pass_ != "cache")


def _kernel_tasks(ctx: Context, headline: bool) -> list:
    """Each kernel at its headline size and the sizes with targets of their own (on a CPU: its first
    small size), or at all the others; ours, the eager baseline and the paths a default is chosen between
    (the two-pass cross-entropy, attention's dQ paths) first, so that a short budget leaves whole lines
    of the plots and answers those questions."""
    from gptfast.bench import report

    found = report.tasks(_settings(ctx, groups=tuple(report.KERNELS)), ctx.device)
    first = {name: ([bench.sizes("small")[0]] if ctx.rehearse else [bench.headline, *bench.targets])
             for name, bench in report.KERNELS.items()}
    chosen = [t for t in found if (t.size in first[t.group]) == headline]
    priority = ("triton", "torch", "sdpa-flash", "triton/two-pass", "triton/dq-kernel", "triton/atomic-dq")
    return sorted(chosen, key=lambda t: priority.index(t.provider) if t.provider in priority else len(priority))


def _against_default_tasks(ctx: Context, group: str) -> list:
    """The training steps of ``group`` (``end_to_end.AGAINST_DEFAULT``), each changing one thing, "triton"
    (without the change) first as the baseline, at each of its sizes (on a CPU the tiny model): tokens/s
    and peak memory."""
    from gptfast.bench import end_to_end, report

    providers, sizes = end_to_end.AGAINST_DEFAULT[group]
    settings = _settings(ctx)
    timing = dict(warmup_ms=settings.warmup_ms, rep_ms=settings.rep_ms)
    return [report.Task(group, provider, "step", size.as_dict(), lambda p=provider, z=size: end_to_end.run_train(
                p, z, ctx.device, group=group, **timing))
            for size in sizes[settings.sizes] for provider in providers]


BENCH_TASKS: dict[str, Callable[[Context], list]] = {
    "train": lambda ctx: _train_tasks(ctx, ("torch", "triton")),  # the baseline first: ours compiles its kernels
    "train-ac": lambda ctx: _against_default_tasks(ctx, "train-ac"),
    "train-choices": lambda ctx: _against_default_tasks(ctx, "train-choices"),
    # The slower compile last: torch+compile compiles every op of the model, triton+compile ours as opaque calls.
    "train-compile": lambda ctx: _train_tasks(ctx, ("triton+compile", "torch+compile")),
    "generate": _generate_tasks,
    "kernels-headline": lambda ctx: _kernel_tasks(ctx, headline=True),
    "kernels-rest": lambda ctx: _kernel_tasks(ctx, headline=False),
}
RESERVE_S = 3.0  # of a bench stage's time, kept for writing after its last case


def _bench_stage(name: str) -> Callable[[Context], dict]:
    def run(ctx: Context) -> dict:
        from gptfast.bench import report

        results = _load_results(ctx)
        before = len(results["records"])
        todo = BENCH_TASKS[name](ctx)
        print(f"{name}: {len(todo)} cases, {ctx.left():.0f} s")
        report.measure_tasks(results, todo, budget_s=max(0.0, ctx.left() - RESERVE_S), out_dir=ctx.out,
                             progress=False)  # one line per case below, not a progress bar in the log
        return _first_calls(results["records"][before:])
    return run


def _first_calls(records: list[dict]) -> dict:
    """The first calls' seconds beyond a steady call (compilation, autotuning), and the records' outcome."""
    ok = [r for r in records if r["status"] == "ok"]
    overhead = sum(max(0.0, r["first_call_s"] - r["ms"] / 1e3) for r in ok if r.get("first_call_s") is not None)
    for r in records:
        peak = f", peak {r['peak_mb']:,.0f} MiB" if r.get("peak_mb") is not None else ""
        figure = (f"{r['value']:,.1f} {r['unit']} (first call {r['first_call_s']:.2f} s{peak})" if r["status"] == "ok"
                  else f"{r['status']}: {r['note']}")
        print(f"  {r['group']} {r['provider']} {r['pass_']} {_size(r['size'])}: {figure}")
    skipped = sum(r["note"].startswith("skipped: out of time") for r in records)
    return {"cases": len(records), "ok": len(ok), "skipped_out_of_time": skipped,
            "first_call_overhead_s": round(overhead, 2)}


def _size(size: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in size.items())


def _fill_skipped(name: str) -> Callable[[Context, str], None]:
    """After the stage: record the cases its process never reached (killed at its limit) as skipped."""
    def finish(ctx: Context, status: str) -> None:
        from gptfast.bench import report
        from gptfast.bench.harness import UNAVAILABLE, Record

        path = ctx.out / "results.json"
        if not path.exists():
            return
        results = json.loads(path.read_text())
        seen = {_key(r["group"], r["provider"], r["pass_"], r["size"]) for r in results["records"]}
        missing = [t for t in BENCH_TASKS[name](ctx) if _key(t.group, t.provider, t.pass_, t.size) not in seen]
        for task in missing:
            record = Record(task.group, task.provider, task.pass_, dict(task.size), status=UNAVAILABLE,
                            note=f"skipped: out of time (the {name} stage {status})")
            results["records"].append(record.to_dict())
        if missing:
            report.write(results, ctx.out, plots=False)
    return finish


def _key(group: str, provider: str, pass_: str, size: dict) -> tuple:
    return group, provider, pass_, json.dumps(size, sort_keys=True)


def _smoke(ctx: Context) -> dict:
    return gpu_run_smoke.run_stage(ctx.out / "smoke.json", ctx.work / "smoke", ctx.rehearse, ctx.deadline)


def _smoke_finish(ctx: Context, status: str) -> None:
    gpu_run_smoke.collect(ctx.out / "smoke.json", ctx.work / "smoke", final=True)


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.json"))}


def _tune(ctx: Context) -> dict:
    """`gptfast lab tune` for each op with default candidates (``spec.tune_candidates``), at GPT-2's shapes
    (``spec.shapes.default``; the rehearsal's at ``shapes.small``), through its command line. The tables it
    writes go into $OUT/tuned.tar.gz; the shipped ones are restored, so later stages time the shipped ones."""
    from gptfast.kernels.flash_attention import CONFIG_DIR as configs  # where `lab tune` writes, as installed
    from gptfast.kernels.registry import SPECS

    _json_file(ctx.work / SHIPPED_FROM, str(configs))  # for _restore_shipped, here or in the driver
    shutil.copytree(configs, ctx.work / SHIPPED, dirs_exist_ok=True)
    before, runs = _digests(configs), []
    todo = [(spec.name, ",".join(map(str, spec.shapes.small if ctx.rehearse else spec.shapes.default)))
            for spec in SPECS.values() if spec.tune_candidates]
    try:
        for op, shape in todo:
            command = [sys.executable, "-m", "gptfast.cli", "lab", "tune", op, "--shape", shape]
            left = ctx.left() - RESERVE_S
            if left < MIN_STAGE_S:
                runs.append({"op": op, "shape": shape, "status": "skipped: out of time"})
                continue
            print("$ " + " ".join(command[1:]), flush=True)
            start = time.time()
            try:
                done = subprocess.run(command, capture_output=True, text=True, timeout=left)
                output, status = done.stdout + done.stderr, "ok" if done.returncode == 0 else f"exit {done.returncode}"
            except subprocess.TimeoutExpired as stopped:
                output, status = _text(stopped.stdout) + _text(stopped.stderr), "skipped: out of time (stopped)"
            print(output, flush=True)
            runs.append({"op": op, "shape": shape, "status": status, "seconds": round(time.time() - start, 1),
                         "output": output[-4000:]})
        changed = sorted(name for name, digest in _digests(configs).items() if before.get(name) != digest)
        tuned = ctx.work / "tuned"
        tuned.mkdir(parents=True, exist_ok=True)
        for name in changed:
            shutil.copy2(configs / name, tuned / name)
        _json_file(tuned / "tune.json", runs)  # what each run printed
        _write_tar(ctx.out / "tuned.tar.gz", {f"configs/{p.name}": p for p in sorted(tuned.glob("*.json"))})
        return {"runs": [{k: v for k, v in r.items() if k != "output"} for r in runs], "tables_written": changed}
    finally:
        _restore_shipped(ctx.work)  # the later stages measure the shipped tables


SHIPPED, SHIPPED_FROM = "shipped-configs", "shipped-configs.json"  # in the work folder: the tables, their folder


def _restore_shipped(work: Path) -> None:
    """The shipped tables the tune stage copied back into the folder it copied them from (none: it never began)."""
    record = work / SHIPPED_FROM
    if record.exists():
        folder = Path(json.loads(record.read_text()))
        for path in (work / SHIPPED).glob("*.json"):
            shutil.copy2(path, folder / path.name)


def _tune_finish(ctx: Context, status: str) -> None:
    """In the driver: the shipped tables back, should the tune stage have been killed mid-way."""
    _restore_shipped(ctx.work)


def _text(value) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else (value or "")


def _json_file(path: Path, data) -> Path:
    path.write_text(json.dumps(data, indent=1) + "\n")
    return path


def _write_tar(path: Path, members: dict[str, Path]) -> None:
    """A .tar.gz of ``members`` (name in the archive -> file), written whole or not at all."""
    partial = path.with_name(path.name + ".partial")
    with tarfile.open(partial, "w:gz") as tar:
        for name, source in members.items():
            tar.add(source, arcname=name)
    os.replace(partial, path)


def _pack(ctx: Context) -> dict:
    """report.tar.gz: the results folder to unpack into bench/results/ (the report, its plots, the smoke,
    the stage table and the tuned tables)."""
    from gptfast.bench import report

    name = report.results_dir(ctx.device, report.RESULTS_ROOT).name
    folder = ctx.work / "pack" / name
    folder.mkdir(parents=True, exist_ok=True)
    if (ctx.out / "results.json").exists():
        report.write(json.loads((ctx.out / "results.json").read_text()), folder, plots=True)
    members = {f"{name}/{p.name}": p for p in sorted(folder.iterdir())}
    for extra in ("smoke.json", "stages.json"):
        if (ctx.out / extra).exists():
            members[f"{name}/{extra}"] = Path(shutil.copy2(ctx.out / extra, ctx.work / extra))
    members |= {f"{name}/configs/{p.name}": p for p in sorted((ctx.work / "tuned").glob("*.json"))}
    _write_tar(ctx.out / "report.tar.gz", members)
    print(f"report.tar.gz: {name}/ with {len(members)} files (tar -xzf report.tar.gz -C bench/results)")
    return {"folder": name, "files": sorted(members)}


# Budgets (s) on the GPU, 510 in all. The headline figures first: training (eager; with activation
# checkpointing; with each kernel choice changed; then compiled: the compilation takes most of its 120 s),
# generation, then each kernel's headline and target sizes: 105 cases planned at about 1 s each (a first
# call from the prepared cache, 50 ms of timing) in 71 s, ours, eager and the paths we choose between
# first, then by the registry's order within a provider, so the budget cuts the last ops' torch.compile
# and liger cases (recorded as skipped). The remaining sizes (471 cases) fill the plots' lines (ours and
# eager first) with their 7 s and what the stages before them left. The tune stage has 45 s: its one op
# with default candidates, attention, compiles and times about 10. The training stages after the first:
# activation checkpointing (train-ac, 35 s), six cases, GPT-2 124M's three at about 3 s each (its kernels
# are in the cache the train stage left), gpt2-xl's at about 5 s each (built on the GPU, a first step, two
# seconds of timed steps); the kernel choices (train-choices, 22 s), GPT-2 124M's step with each of four
# choices changed after the default's, about 3 s a case, more for the attention paths beyond the dQ
# workspace, which the prepared cache lacks (compiled on their first call). A case the budget does not
# reach is recorded as skipped.
# In the CPU rehearsal (tiny sizes, the interpreter) a stage's process takes about 5 s to start (torch's
# import) and its deadline is its budget less KILL_GRACE_S. The run's time is the sum of these budgets (a
# bench stage takes what it is given, and the time earlier stages leave), which the suite pays on every
# run, so they are the least that exercises each stage: versions and ceilings finish (the seconds they
# leave go to the smoke); the smoke's two processes each finish their first case (attention's check, the
# model's step: about 25 s with the processes' starts, on a lightly loaded machine: its budget leaves a
# margin for a loaded one); a bench stage sets out its cases and times the
# first few or none, the rest recorded as skipped (the measuring itself is tests/test_benchmarks.py's); the
# tune stage gets its start, a `lab tune` process's start (MIN_STAGE_S at least) and RESERVE_S; the pack,
# last, a margin for the earlier stages' overruns.
STAGES: tuple[Stage, ...] = (
    Stage("versions", 10, 8, _versions, "versions, device, nvidia-smi, the Triton cache's fingerprint"),
    Stage("ceilings", 15, 8, _ceilings, "copy bandwidth and bf16 matmul (the report's header)"),
    Stage("smoke", 90, 34, _smoke, "every op forward and backward against float64, the model triton vs torch",
          _smoke_finish),
    Stage("train", 45, 5, _bench_stage("train"), "GPT-2 124M training: torch, triton", _fill_skipped("train")),
    Stage("train-ac", 35, 5, _bench_stage("train-ac"), "activation checkpointing none, selective, full: GPT-2 "
          "124M and gpt2-xl training tokens/s and peak memory", _fill_skipped("train-ac")),
    Stage("train-choices", 22, 5, _bench_stage("train-choices"), "GPT-2 124M training with each kernel choice "
          "changed from its default (mlp_gelu, two-pass cross-entropy, attention's dQ kernel or atomic dQ): "
          "tokens/s against the default",
          _fill_skipped("train-choices")),
    Stage("train-compile", 120, 5, _bench_stage("train-compile"), "the same under torch.compile",
          _fill_skipped("train-compile")),
    Stage("generate", 40, 6, _bench_stage("generate"), "generation tokens/s", _fill_skipped("generate")),
    Stage("kernels-headline", 71, 6, _bench_stage("kernels-headline"), "each kernel at its headline, target sizes",
          _fill_skipped("kernels-headline")),
    Stage("tune", 45, 22, _tune, "gptfast lab tune: each op with default candidates, at GPT-2's shapes",
          _tune_finish),
    Stage("kernels-rest", 7, 6, _bench_stage("kernels-rest"), "the remaining kernel sizes",
          _fill_skipped("kernels-rest")),
    Stage("pack", 10, 12, _pack, "report.tar.gz: the results folder with its plots"),
)
STAGE_NAMES = tuple(s.name for s in STAGES)


# ---------------------------------------------------------------- the driver


def _write_json(path: Path, data) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(partial, path)


def _run_stage_process(stage: Stage, ctx: Context, limit: float) -> tuple[str, float]:
    """The stage in its own process group, killed at ``limit``: (status, seconds). Its deadline is also its
    own, so a stage left running by a killed driver stops by itself."""
    command = [sys.executable, __file__, "--stage", stage.name, "--out", str(ctx.out),
               "--work", str(ctx.work), "--deadline", f"{ctx.deadline:.3f}"] + ["--rehearse"] * ctx.rehearse
    start = time.time()
    process = subprocess.Popen(command, preexec_fn=os.setpgrp)  # its own group, killed whole; the run's session
    try:
        code = process.wait(timeout=limit)
        status = "ok" if code == 0 else f"failed (exit {code})"
    except subprocess.TimeoutExpired:
        _signal_group(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=KILL_GRACE_S)
        except subprocess.TimeoutExpired:
            pass
        status = f"stopped at its {limit:.0f} s limit"
    _signal_group(process.pid, signal.SIGKILL)  # whatever the stage left running (its workers)
    process.wait()
    return status, time.time() - start


def _signal_group(group: int, signal_number: int) -> None:
    try:
        os.killpg(group, signal_number)
    except ProcessLookupError:
        pass


def _stage_table(stages: list[dict], rehearse: bool) -> str:
    head = f"{'stage':<17} {'budget':>7} {'used':>6}  status"
    lines = [head, "-" * len(head)]
    for s in stages:
        used = f"{s['used_s']:.0f} s" if s.get("used_s") is not None else ""
        cache = s.get("triton") or {}
        extra = (f"; Triton: {cache['hits']} cache hits, {cache['misses']} compiled in {cache['compile_s']} s"
                 if cache.get("hits") or cache.get("misses") else "")
        lines.append(f"{s['name']:<17} {s['budget_s']:>5.0f} s {used:>6}  {s['status']}{extra}")
    total = sum(s["budget_s"] for s in stages)
    lines.append(f"{'total':<17} {total:>5.0f} s" + (" (rehearsal budgets; on the GPU " +
                                                      f"{sum(s.budget_s for s in STAGES):.0f} s)" if rehearse else ""))
    return "\n".join(lines)


def drive(out: Path, rehearse: bool, only: tuple[str, ...] = STAGE_NAMES) -> int:
    """Run the stages in order into ``out``; the stage table is rewritten into stages.json after each."""
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gptfast-gpu-"))
    cache = gpu_run_cache.choose(work / "triton-cache", rehearse)
    os.environ["TRITON_CACHE_DIR"] = str(cache["dir"])
    stages = [dict(name=s.name, budget_s=s.budget(rehearse), status="pending", what=s.what)
              for s in STAGES if s.name in only]
    started = time.time()
    deadline = started + sum(s["budget_s"] for s in stages)
    summary = {"schema": 1, "started": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
               "rehearsal": rehearse, "total_budget_s": sum(s["budget_s"] for s in stages), "triton_cache":
               {k: str(v) if isinstance(v, Path) else v for k, v in cache.items()}, "stages": stages}
    print(("REHEARSAL on a CPU at tiny sizes; " if rehearse else "") + f"stages, {summary['total_budget_s']:.0f} s "
          f"in all (the run ends by itself by then):\n" + _stage_table(stages, rehearse), flush=True)
    print(f"Triton cache: {cache['reason']}", flush=True)
    bank = 0.0  # the seconds earlier stages left unused, passed on to the next ones
    for entry, stage in zip(stages, [s for s in STAGES if s.name in only]):
        limit = min(entry["budget_s"] + bank, deadline - time.time())
        if limit < MIN_STAGE_S:
            entry["status"] = "skipped: out of time"
            _write_json(out / "stages.json", summary)
            continue
        ctx = Context(out=out, work=work, rehearse=rehearse, deadline=time.time() + limit - KILL_GRACE_S)
        print(f"\n=== {stage.name} ({stage.what}): {limit:.0f} s", flush=True)
        entries_before = gpu_run_cache.entries(cache["dir"])
        entry.update(status="running", limit_s=round(limit, 1))
        _write_json(out / "stages.json", summary)
        status, used = _run_stage_process(stage, ctx, limit)
        if stage.finish is not None:
            stage.finish(ctx, status)
        reported = work / f"stage-{stage.name}.json"
        entry.update(json.loads(reported.read_text()) if reported.exists() else {})
        entry.update(status=status, used_s=round(used, 1), triton_cache_entries_added=gpu_run_cache.entries(
            cache["dir"]) - entries_before)
        bank = max(0.0, min(bank + entry["budget_s"] - used, 60.0))
        summary["duration_s"] = round(time.time() - started, 1)
        _write_json(out / "stages.json", summary)
    print("\n" + _stage_table(stages, rehearse), flush=True)
    shutil.rmtree(work, ignore_errors=True)
    return 0


def run_one_stage(name: str, ctx: Context) -> int:
    """A stage's process: run it, write its summary for the driver (Triton's compile counts included)."""
    stage = next(s for s in STAGES if s.name == name)
    counts = gpu_run_cache.listen()
    found = stage.run(ctx)
    triton = found.pop("triton", None) or (counts.as_dict() if counts else None)  # the smoke's: its workers'
    summary = {"result": found, "triton": triton}
    _write_json(ctx.work / f"stage-{name}.json", summary)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bash bench/gpu.sh", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rehearse", action="store_true", help="on a CPU at tiny sizes (TRITON_INTERPRET=1)")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "out/gpu")))
    parser.add_argument("--only", action="append", choices=STAGE_NAMES, help="run only this stage (repeatable)")
    parser.add_argument("--stage", choices=STAGE_NAMES, help=argparse.SUPPRESS)  # a stage's own process
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.stage:
        return run_one_stage(args.stage, Context(args.out, args.work, args.rehearse, args.deadline))
    return drive(args.out, args.rehearse, tuple(args.only or STAGE_NAMES))


if __name__ == "__main__":
    sys.exit(main())
