"""The benchmark report: run the chosen groups, then write JSON, markdown and plots.

A run measures the device's ceilings first, then every (provider, pass, size) of the chosen groups,
each into a :class:`~gptfast.bench.harness.Record`. ``results.json`` keeps the raw numbers with the
device, the versions and the command; ``results.md`` the tables; ``<kernel>.png`` speed against size.
The pytest suite (``pytest --benchmark``) runs the same :func:`tasks`.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import importlib.metadata
import json
import platform
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm import tqdm

from gptfast.kernels.registry import SPECS

from . import end_to_end
from .ceilings import Ceilings, measure_ceilings
from .harness import OK, REP_MS, UNAVAILABLE, WARMUP_MS, Record
from .kernel_bench import KernelBench, bench_dtype, run_case

# Every op's benchmarks, as their specs declare them (flash attention's training and decode).
KERNELS: dict[str, KernelBench] = {b.name: b for spec in SPECS.values() for b in spec.benchmarks}
# Training first: the end-to-end targets matter most if a time budget cuts the run short.
GROUPS = ("train", "generate", *KERNELS)
PROVIDERS = tuple(dict.fromkeys([*end_to_end.TRAIN_PROVIDERS, *end_to_end.GENERATE_PROVIDERS,
                                 *(p for bench in KERNELS.values() for p in bench.providers)]))
# Relative to the working directory (the repository root in a checkout), never inside an installed package.
RESULTS_ROOT = Path("bench") / "results"
README_START, README_END = "<!-- bench-results:start -->", "<!-- bench-results:end -->"
SCHEMA = 2  # 2: do_bench timing, each record's p20_ms, p80_ms and first_call_s
NO_MATPLOTLIB = "no plots: the PNGs need matplotlib, in the bench extra (pip install 'gptfast-triton[bench]')"


@dataclasses.dataclass
class Settings:
    groups: tuple[str, ...] = GROUPS
    sizes: str = "full"  # "full", "small" or "headline"
    providers: tuple[str, ...] = ()  # empty: every provider
    warmup_ms: float = WARMUP_MS
    rep_ms: float = REP_MS
    budget_s: float | None = None  # the cases left once this many seconds of measuring have passed are skipped


def device_info(device: torch.device) -> dict:
    if device.type != "cuda":
        return {"type": device.type, "name": platform.processor() or platform.machine(),
                "slug": "cpu"}
    props = torch.cuda.get_device_properties(device)
    return {"type": "cuda", "name": props.name, "slug": re.sub(r"[^a-z0-9]+", "-", props.name.lower()).strip("-"),
            "multiprocessors": props.multi_processor_count, "memory_gib": props.total_memory / 2**30,
            "l2_mib": getattr(props, "L2_cache_size", 0) / 2**20, "capability": f"{props.major}.{props.minor}"}


def versions() -> dict:
    found = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
             "commit": _git_commit()}
    for package in ("triton", "liger-kernel", "gptfast-triton"):
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[package] = None
    return found


def _git_commit() -> str | None:
    """The repository's commit, with "+dirty" for uncommitted changes; None outside a git checkout."""
    root = Path.cwd()
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+dirty" if dirty else "")


@dataclasses.dataclass(frozen=True)
class Task:
    """One measurement to make: what it is, and the call that makes it."""

    group: str
    provider: str
    pass_: str
    size: dict
    measure: Callable[[], Record]

    def __str__(self) -> str:
        return " ".join(filter(None, (self.group, self.provider, self.pass_, _size_label(self.size))))


def tasks(settings: Settings, device: torch.device) -> list[Task]:
    """Every measurement the settings ask for, in order (unknown groups or providers refused)."""
    for kind, chosen, known in (("groups", settings.groups, GROUPS), ("providers", settings.providers, PROVIDERS)):
        if set(chosen) - set(known):
            raise ValueError(f"unknown {kind} {sorted(set(chosen) - set(known))}: choose from {', '.join(known)}")
    dtype, timing = bench_dtype(device), dict(warmup_ms=settings.warmup_ms, rep_ms=settings.rep_ms)
    wanted = lambda provider: not settings.providers or provider in settings.providers  # noqa: E731
    e2e_mode = "small" if settings.sizes == "small" else "full"
    found: list[Task] = []
    for group in settings.groups:
        if group == "train":
            size = end_to_end.TRAIN_SIZES[e2e_mode]
            found += [Task(group, p, "step", size.as_dict(), lambda p=p, z=size: end_to_end.run_train(
                           p, z, device, **timing)) for p in filter(wanted, end_to_end.TRAIN_PROVIDERS)]
        elif group == "generate":
            found += [Task(group, p, mode, size.as_dict(), lambda p=p, m=mode, z=size:
                           end_to_end.run_generate(p, m, z, device, rep_ms=settings.rep_ms))
                      for size in end_to_end.GENERATE_SIZES[e2e_mode]
                      for p in filter(wanted, end_to_end.GENERATE_PROVIDERS) for mode in end_to_end.GENERATE_MODES[p]]
        else:
            bench = KERNELS[group]
            found += [Task(group, p, pass_, size, lambda b=bench, p=p, s=pass_, z=size: run_case(
                          b, p, s, z, device, dtype, **timing))
                      for size in bench.sizes(settings.sizes) for p in filter(wanted, bench.providers)
                      for pass_ in bench.passes]
    return found


def begin(settings: Settings, device: torch.device, command: str) -> dict:
    """The results of a run about to start, as a JSON-ready dictionary: the device, the versions, the
    settings and the ceilings (measured now); no records yet."""
    ceilings = measure_ceilings(device, small=settings.sizes == "small")
    return {
        "schema": SCHEMA,
        "started": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "finished": False,
        "duration_s": 0.0,
        "command": command,
        "device": device_info(device),
        "versions": versions(),
        "settings": dataclasses.asdict(settings),
        "dtype": str(bench_dtype(device)).removeprefix("torch."),
        "ceilings": dataclasses.asdict(ceilings),
        "records": [],
    }


def measure_tasks(results: dict, todo: list[Task], budget_s: float | None = None, out_dir: Path | None = None,
                  progress: bool = True) -> None:
    """Measure ``todo`` into ``results["records"]``; once ``budget_s`` seconds have passed, the cases
    left are recorded as skipped. With ``out_dir``, results.json and results.md are rewritten after
    every case, so a run stopped from outside keeps what it measured."""
    ceilings, start, said = Ceilings(**results["ceilings"]), time.perf_counter(), set()
    for task in (bar := tqdm(todo, desc="bench", unit="case", mininterval=2.0, disable=not progress)):
        bar.set_postfix_str(str(task)[:60])
        if budget_s is not None and time.perf_counter() - start > budget_s:
            record = Record(task.group, task.provider, task.pass_, dict(task.size), status=UNAVAILABLE,
                            note=f"skipped: out of time (a budget of {budget_s:.0f} s)")
        else:
            record = task.measure()
            record.pct_of_ceiling = ceilings.percent(record)
        results["records"].append(record.to_dict())
        results["duration_s"] = time.time() - dt.datetime.fromisoformat(results["started"]).timestamp()
        if out_dir is not None:
            write(results, out_dir, plots=False)
        reason = f"{record.group} {record.provider}: {record.note}"
        if progress and record.status != OK and reason not in said:
            said.add(reason)
            tqdm.write(f"{record.status}: {reason}")


def run(settings: Settings, device: torch.device, command: str, progress: bool = True,
        out_dir: Path | None = None) -> dict:
    """Measure everything ``settings`` asks for (see :func:`measure_tasks`); the results."""
    todo = tasks(settings, device)
    results = begin(settings, device, command)
    if progress:
        ceilings = results["ceilings"]
        tqdm.write(f"ceilings on {results['device']['name']}: copy {ceilings['copy_gbps']:,.0f} GB/s, "
                   f"{ceilings['matmul_dtype']} matmul {_fmt(ceilings['matmul_tflops'])} TFLOP/s")
    measure_tasks(results, todo, settings.budget_s, out_dir, progress)
    results["finished"] = True
    return results


# ---------------------------------------------------------------- writing the results


def results_dir(device: torch.device, root: Path = RESULTS_ROOT) -> Path:
    """``<root>/<today>-<device>``, with a numeric suffix if that already exists."""
    today = dt.datetime.now(dt.timezone.utc).date().isoformat()
    base = root / f"{today}-{device_info(device)['slug']}"
    path, n = base, 2
    while path.exists():
        path, n = base.with_name(f"{base.name}-{n}"), n + 1
    return path


def _write_json(results: dict, path: Path) -> None:
    """Write through a temporary file, so a run killed mid-write leaves the previous complete JSON."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".json.tmp")
    temporary.write_text(json.dumps(results, indent=1) + "\n")
    temporary.replace(path)


def write(results: dict, out_dir: Path, plots: bool = True) -> list[Path]:
    """Write results.json, results.md and (if asked) one PNG per kernel into ``out_dir``."""
    written = [out_dir / "results.json", out_dir / "results.md"]
    _write_json(results, written[0])
    written[1].write_text(markdown(results))
    return written + (plot(results, out_dir) if plots else [])


def _records(results: dict) -> list[Record]:
    return [Record.from_dict(r) for r in results["records"]]


def _fmt(value: float | None) -> str:
    """Whole numbers from 100 up, three significant digits below (CPU figures can be tiny)."""
    if value is None:
        return ""
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"


def _cell(record: Record | None) -> str:
    if record is None:
        return "-"
    if record.status != OK:
        return "n/a"
    pct = f" ({record.pct_of_ceiling:.0f}%)" if record.pct_of_ceiling is not None else ""
    return f"{_fmt(record.value)}{pct}"


def _size_label(size: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in size.items())


def _header(results: dict) -> list[str]:
    dev, ver, ceil = results["device"], results["versions"], results["ceilings"]
    return [
        f"Device: {dev['name']} ({dev['type']}); torch {ver['torch']}, triton {ver['triton']}, "
        f"Liger-Kernel {ver['liger-kernel'] or 'not installed'}; dtype {results['dtype']}; "
        f"{results['started']}, {results['duration_s']:.0f} s"
        f"{'' if results.get('finished', True) else ' (stopped before the end: partial results)'}.",
        "",
        f"Command: `{results['command']}`",
        "",
        f"Ceilings: copy {_fmt(ceil['copy_gbps'])} GB/s (read + write), {ceil['matmul_dtype']} "
        f"{ceil['matmul_size']}^3 matmul {_fmt(ceil['matmul_tflops'])} TFLOP/s. Percentages are of these.",
        *_target_line(results.get("lab_target")),
    ]


def _target_line(target: dict | None) -> list[str]:
    """The lab's target for this device (the run records it on a GPU): the numbers of its static estimates,
    beside the ceilings measured above."""
    if not target:
        return []
    return ["", f"The lab's target for this device: {target['name']} ({target['part']}, {target['sm_count']} SMs): "
            f"its static estimates (`gptfast lab inspect --target {target['name'].removeprefix('like-')}`) take "
            f"{_fmt(target['bandwidth'] / 1e9)} GB/s ({target['bandwidth_source']}) and "
            f"{_fmt(target['tensor_core_flops'] / 1e12)} TFLOP/s at {target['clock_hz'] / 1e9:.3g} GHz."]


def _table(columns: list[str], rows: list[list[str]]) -> list[str]:
    """A markdown table."""
    return [f"| {' | '.join(cells)} |" for cells in (columns, ["---"] * len(columns), *rows)]


def _key(provider: str, pass_: str, size: dict) -> tuple[str, str, str]:
    return provider, pass_, json.dumps(size, sort_keys=True)


def _kernel_table(bench: KernelBench, records: list[Record], sizes: list[dict]) -> list[str]:
    """Figures per size and pass, a column per provider, and ours over the baseline."""
    providers = [p for p in bench.providers if any(r.provider == p for r in records)]
    index = {_key(r.provider, r.pass_, r.size): r for r in records}
    rows = []
    for size in sizes:
        for pass_ in bench.passes:
            row = {p: index.get(_key(p, pass_, size)) for p in providers}
            if any(row.values()):
                ours, base = row.get("triton"), row.get(bench.baseline)
                both = ours and base and ours.status == OK and base.status == OK
                rows.append([_size_label(size), pass_, *map(_cell, row.values()),
                             f"{ours.value / base.value:.2f}x" if both else ""])
    return _table(["size", "pass", *providers, f"triton / {bench.baseline}"], rows)


def _memory_table(bench: KernelBench, records: list[Record], sizes: list[dict]) -> list[str]:
    """Peak device memory of forward+backward per size, a column per provider (GPU runs only)."""
    index = {_key(r.provider, r.pass_, r.size): r for r in records if r.peak_mb is not None}
    providers = [p for p in bench.providers if any(k[:2] == (p, "forward+backward") for k in index)]
    cells = [[index.get(_key(p, "forward+backward", size)) for p in providers] for size in sizes]
    rows = [[_size_label(size), *(_fmt(c.peak_mb) if c else "n/a" for c in row)]
            for size, row in zip(sizes, cells) if any(row)]
    if not rows:
        return []
    return ["Peak memory, forward+backward (MiB, inputs included):", "", *_table(["size", *providers], rows), ""]


def _e2e_table(records: list[Record], group: str) -> list[str]:
    """Training (with MFU and the first step's seconds) or generation rows, each against torch eager."""
    rows = [r for r in records if r.group == group]
    train = group == "train"
    columns = (["provider", "mode", "tokens/s", "vs torch", "MFU: measured / datasheet peak", "peak memory",
                "first step"] if train else ["provider", "mode", "batch", "tokens/s", "vs torch", "peak memory"])
    table = []
    for r in rows:
        cells = [r.provider, r.pass_, *(() if train else (str(r.size["batch"]),))]
        if r.status != OK:
            cells += ["n/a"] + [""] * (len(columns) - len(cells) - 1)
        else:
            # Generation compares every mode (and transformers) with torch eager's cached decoding.
            base_pass = r.pass_ if train else "cache"
            base = next((b for b in rows if b.provider == "torch" and b.pass_ == base_pass and b.size == r.size
                         and b.status == OK), None)
            cells += [_fmt(r.value), f"{r.value / base.value:.2f}x" if base else ""]
            if train:
                datasheet = r.extra.get("mfu_of_datasheet_pct")
                cells.append(f"{_fmt(r.pct_of_ceiling)}%" + (f" / {datasheet:.0f}%" if datasheet else ""))
            cells.append(f"{r.peak_mb / 1024:.1f} GiB" if r.peak_mb is not None else "")
            if train:
                cells.append(f"{r.first_call_s:.1f} s" if r.first_call_s is not None else "")  # schema 1: none
        table.append(cells)
    return _table(columns, table) if rows else []


def _against_default_table(records: list[Record], group: str, title: str, default: str) -> list[str]:
    """Each provider of ``group`` (training steps that change one thing) with its tokens/s and peak memory
    against "triton" (``default``: the step without the change) at the same size, in the same run."""
    rows = [r for r in records if r.group == group]
    table = []
    for r in rows:
        base = next((b for b in rows if b.provider == "triton" and b.size == r.size and b.status == OK), None)
        cells = [r.size["preset"], f"{r.size['batch']} x {r.size['context']}", r.provider]
        if r.status != OK:
            table.append(cells + ["n/a", "", "", ""])
            continue
        memory = r.peak_mb is not None and base is not None and base.peak_mb
        table.append(cells + [_fmt(r.value), f"{r.value / base.value:.2f}x" if base else "",
                              f"{r.peak_mb / 1024:.1f} GiB" if r.peak_mb is not None else "",
                              f"{r.peak_mb / base.peak_mb:.2f}x" if memory else ""])
    columns = ["model", "batch x context", "provider", "tokens/s", f"vs {default}", "peak memory", f"vs {default}"]
    return [f"## {title}", "", *_table(columns, table), ""] if rows else []


def _targets(records: list[Record]) -> list[str]:
    """The issue's training targets, met or missed, when GPT-2 124M was measured at full size."""
    train = {r.provider: r.value for r in records if r.group == "train" and r.status == OK
             and r.size == end_to_end.TRAIN_SIZES["full"].as_dict()}
    verdict = lambda value, target: "met" if value >= target else "missed"  # noqa: E731
    lines = [f"- {ours} / {base}: {train[ours] / train[base]:.2f}x (target {target}x: "
             f"{verdict(train[ours] / train[base], target)})"
             for ours, base, target in end_to_end.SPEEDUP_TARGETS if ours in train and base in train]
    provider, target = end_to_end.TOKENS_PER_S_TARGET
    if provider in train:
        lines.append(f"- {provider}: {_fmt(train[provider])} tokens/s (target {target:,}: "
                     f"{verdict(train[provider], target)})")
    return ["Targets:", "", *lines, ""] if lines else []


def _end_to_end(records: list[Record], level: str) -> list[str]:
    """Training then generation tables under ``level`` headings, and the training targets."""
    lines = []
    for group, title in (("train", "Training steps"), ("generate", "Generation")):
        table = _e2e_table(records, group)
        if table:
            size = {k: v for k, v in next(r.size for r in records if r.group == group).items() if k != "batch"
                    or group == "train"}  # generation tables have a batch column
            lines += [f"{level} {title} ({_size_label(size)})", "", *table, ""]
            if group == "train":
                lines += _targets(records)
    return lines


def _unavailable(records: list[Record]) -> list[str]:
    seen: dict[str, None] = {}
    for r in records:
        if r.status != OK:
            seen.setdefault(f"- {r.group} / {r.provider} ({r.status}): {r.note}", None)
    return ["## Not measured", "", *seen] if seen else []


def markdown(results: dict) -> str:
    """The full report as markdown: header, one table per kernel, end to end, what was not measured."""
    records = _records(results)
    lines = ["# Benchmark results", "", *_header(results), ""]
    for name, bench in KERNELS.items():
        rows = [r for r in records if r.group == name]
        if rows:
            sizes = bench.sizes(results["settings"]["sizes"])
            lines += [f"## {name} ({bench.unit}, % of ceiling)", "", *_kernel_table(bench, rows, sizes), ""]
            lines += _memory_table(bench, rows, sizes)
    lines += _end_to_end(records, "##")
    lines += _against_default_table(records, end_to_end.AC_GROUP, "Activation checkpointing", "none")
    lines += _against_default_table(records, end_to_end.CHOICE_GROUP, "Kernel choices in the training step",
                                    "default")
    lines += _unavailable(records)
    return "\n".join(lines).rstrip() + "\n"


def plot(results: dict, out_dir: Path) -> list[Path]:
    """One PNG per kernel: a row per sweep, a column per pass, a line per provider (none, said in one
    line, without matplotlib)."""
    try:
        import matplotlib
    except ImportError:
        print(NO_MATPLOTLIB, file=sys.stderr)
        return []
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [r for r in _records(results) if r.status == OK]
    written = []
    for name, bench in KERNELS.items():
        mine = [r for r in records if r.group == name]
        if not mine:
            continue
        sweeps = bench.sweeps(results["settings"]["sizes"])
        passes = bench.passes
        fig, axes = plt.subplots(len(sweeps), len(passes), figsize=(5 * len(passes), 3.6 * len(sweeps)),
                                 squeeze=False)
        for row, sweep in enumerate(sweeps):
            for col, pass_ in enumerate(passes):
                ax = axes[row][col]
                for provider in bench.providers:
                    points = [(s[sweep.x], r.value) for s in sweep.sizes for r in mine
                              if r.provider == provider and r.pass_ == pass_ and r.size == s]
                    if points:
                        xs, ys = zip(*points)
                        ax.plot(xs, ys, marker="o", label=provider)
                ax.set_xscale("log", base=2)
                ticks = [s[sweep.x] for s in sweep.sizes]
                ax.set_xticks(ticks, [str(t) for t in ticks], fontsize=8)
                ax.minorticks_off()
                ax.set_title(f"{name} {pass_} ({sweep.name})", fontsize=10)
                ax.set(xlabel=sweep.x, ylabel=bench.unit)
                ax.grid(True, alpha=0.3)
                if ax.lines:
                    ax.legend(fontsize=8)
        fig.suptitle(f"{name} on {results['device']['name']} ({results['dtype']})")
        fig.tight_layout()
        path = out_dir / f"{name}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    return written


# ---------------------------------------------------------------- the README's table


def latest_results(root: Path = RESULTS_ROOT) -> Path | None:
    """The newest GPU results.json under ``root`` (by start time), or None; CPU runs are never quoted."""
    found = [(json.loads(p.read_text()), p) for p in root.glob("*/results.json")]
    found = sorted((r["started"], p) for r, p in found if r["device"]["type"] == "cuda")
    return found[-1][1] if found else None


def readme_table(results: dict, source: str) -> str:
    """The README's summary: each kernel's forward+backward (or its one pass) at its headline size, then
    end to end."""
    records = _records(results)
    kernel_rows = []
    for name, bench in KERNELS.items():
        pass_ = bench.passes[-1]
        rows = [r for r in records if r.group == name and r.pass_ == pass_ and r.size == bench.headline]
        if rows:
            ours = next((r for r in rows if r.provider == "triton"), None)
            others = ", ".join(f"{r.provider} {_cell(r)}" for r in rows if r.provider != "triton")
            kernel_rows.append([f"{name} ({bench.unit}, {pass_})", _size_label(bench.headline), _cell(ours), others])
    lines = [*_header(results), "", f"Full report: `{source}`.", ""]
    if kernel_rows:
        lines += [*_table(["kernel (pass)", "size", "ours (triton)", "baselines"], kernel_rows), ""]
    lines += _end_to_end(records, "####")
    return "\n".join(lines).rstrip()


def update_readme(readme: Path, results_json: Path) -> None:
    """Replace the README's text between the result markers with the table of ``results_json``."""
    text = readme.read_text()
    if README_START not in text or README_END not in text:
        raise ValueError(f"{readme} lacks the markers {README_START} and {README_END}")
    results = json.loads(results_json.read_text())
    try:
        source = results_json.parent.resolve().relative_to(readme.parent.resolve()).as_posix()
    except ValueError:
        source = str(results_json.parent)
    head, rest = text.split(README_START, 1)
    _, tail = rest.split(README_END, 1)
    readme.write_text(f"{head}{README_START}\n{readme_table(results, source + '/results.md')}\n{README_END}{tail}")
