"""``lab bench`` and ``lab tune``: measurements, on a GPU only (the CLI refuses without one).

bench: the op's benchmark (``gptfast.bench``'s KernelBench: our kernel, eager, torch.compile, SDPA and
Liger where installed) at one size, forward, backward and both, timed by ``triton.testing.do_bench``
through the bench harness, each with its percentage of the measured copy or matmul ceiling.
tune: the candidate configurations (``--config``, each one candidate) that ``inspect`` finds
spill-free and unserialised on this GPU, each timed forward + backward with our kernel; for
attention the fastest goes into this GPU's table (gptfast/kernels/configs/flash_attention_sm<table>.json, or
``--write FILE``) with the device, versions and times.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import torch

from . import analysis
from .ops import Op, configured, parse_config
from .targets import ARCHITECTURES, Architecture

BENCH_SIZES = {  # shape -> the benchmark's size keys
    "layer_norm": lambda s: dict(rows=s[0], hidden=s[1]),
    "bias_gelu": lambda s: dict(rows=s[0], hidden=s[1]),
    "cross_entropy": lambda s: dict(rows=s[0], vocab=s[1]),
    "flash_attention": lambda s: dict(batch=s[0], heads=s[1], seq=s[2], head_dim=s[3]),
}


def _benchmark(op: Op):
    return importlib.import_module(f"gptfast.bench.{op.name}").BENCH


def local_architecture() -> Architecture:
    major, minor = torch.cuda.get_device_capability()
    arch = ARCHITECTURES.get(10 * major + minor, ARCHITECTURES[90 if major >= 9 else 80])
    props = torch.cuda.get_device_properties(0)
    return Architecture(**{**arch.__dict__, "sm_count": props.multi_processor_count})


def bench(op: Op, shape_text: str | None, dtype: str) -> str:
    from gptfast.bench.ceilings import measure_ceilings
    from gptfast.bench.kernel_bench import PASSES, run_case

    device = torch.device("cuda")
    ceilings = measure_ceilings(device)
    benchmark, size = _benchmark(op), BENCH_SIZES[op.name](op.parse_shape(shape_text))
    lines = [f"{op.name} {size} {dtype} on {torch.cuda.get_device_name()} (measured, do_bench median; copy "
             f"{ceilings.copy_gbps:.0f} GB/s, matmul {ceilings.matmul_tflops:.0f} TFLOP/s)"]
    for provider in benchmark.providers:
        for pass_ in PASSES:
            r = run_case(benchmark, provider, pass_, size, device, analysis.DTYPES[dtype])
            pct = ceilings.percent(r)
            figure = (f"{r.ms * 1e3:9.1f} us  {r.value:8.1f} {r.unit}" + (f"  {pct:5.1f}% of ceiling" if pct else "")
                      if r.status == "ok" else f"{r.status}: {r.note}")
            lines.append(f"{provider:<14} {pass_:<17} {figure}")
    return "\n".join(lines)


# The candidates `lab tune` tries without --config: the shipped table ("shipped", no override) and,
# one kernel at a time, the tile shapes and warp counts the Hopper and Ampere entries choose among.
DEFAULT_CANDIDATES = {
    "flash_attention": ["shipped"] + [f"attention_fwd:BLOCK_M={m},BLOCK_N={n},num_warps={w},num_stages={s}"
                                      for m, n, w, s in ((128, 64, 4, 2), (128, 64, 8, 3), (128, 128, 8, 3),
                                                         (64, 64, 4, 3), (128, 32, 8, 3))]
                       + [f"attention_bwd_kv:BLOCK_M={m},BLOCK_N={n},num_warps={w}"
                          for m, n, w in ((64, 64, 4), (32, 64, 4), (64, 128, 8), (16, 128, 8))]
                       + [f"attention_bwd_q:BLOCK_M={m},BLOCK_N={n},num_warps={w}"
                          for m, n, w in ((64, 64, 4), (128, 64, 8), (64, 32, 4))],
}


def tune(op: Op, shape_text: str | None, dtype: str, candidates: list[str] | None,
         write: Path | None = None) -> str:
    from gptfast.bench.harness import measure
    from gptfast.bench.kernel_bench import pass_call, triton_backend

    candidates = candidates or DEFAULT_CANDIDATES.get(op.name)
    if not candidates:
        raise ValueError(f"lab tune: {op.name} has no default candidates: give them with --config (one each)")
    variant = [c for c in candidates if any(k.endswith(("_atomic", "_masked")) for k in _overrides(c))]
    if variant:  # tune times the default variant (deterministic, no dropout or key_start): never these entries
        raise ValueError(f"lab tune: {variant[0]!r}: tune times the deterministic backward and the forward "
                         "without dropout or key_start only")
    arch, shape = local_architecture(), op.parse_shape(shape_text)
    requests = [analysis.Request(op, shape, dtype, arch, _overrides(c), {}) for c in candidates]
    device = torch.device("cuda")
    benchmark, size = _benchmark(op), BENCH_SIZES[op.name](shape)
    lines = [f"{op.name} {size} {dtype} on {torch.cuda.get_device_name()}: forward + backward, measured"]
    times = {}
    for candidate, (report, _) in zip(candidates, analysis.inspect_many(requests)):
        bad = [k["name"] for k in report["kernels"] if k["spill_bytes"] or k["serialized_mma"]]
        if bad:
            lines.append(f"{candidate:<50} skipped: spills or serialised wgmma in {', '.join(bad)}")
            continue
        overrides = _overrides(candidate)
        with configured(op, overrides, "forward"), configured(op, overrides, "backward"):
            forward = triton_backend(lambda *a: benchmark.providers["triton"](device)(*a))(device)
            inputs = benchmark.make_inputs(size, device, analysis.DTYPES[dtype])
            ms = measure(pass_call(forward, inputs, "forward+backward"), device,
                         grad_to_none=[t for t in inputs if t.requires_grad])[0]
        times[candidate] = ms
        lines.append(f"{candidate:<50} {ms * 1e3:9.1f} us")
    if not times:
        return "\n".join(lines + ["no candidate ran: nothing to write"])
    best = min(times, key=times.get)
    lines.append(f"fastest: {best} ({times[best] * 1e3:.1f} us)")
    if op.name == "flash_attention":
        lines.append(_write_attention_winner(op, shape, dtype, best, times, write))
    else:  # the row ops derive their blocks from the row length: there is no table to write
        lines.append(f"{op.name} has no configuration table: its launcher derives the blocks from the row length")
    return "\n".join(lines)


def _overrides(candidate: str) -> dict[str, dict[str, int]]:
    return {} if candidate == "shipped" else parse_config([candidate])


def _write_attention_winner(op: Op, shape: tuple[int, ...], dtype: str, best: str, times: dict[str, float],
                            write: Path | None) -> str:
    """Put the winner into the attention table of this GPU (its JSON file, or ``write``), with the
    device, the versions and the times in the table's source note."""
    import triton

    fa = op.module
    q = torch.empty(shape[0], shape[1], shape[2], shape[3], dtype=analysis.DTYPES[dtype], device="cuda")
    with configured(op, _overrides(best), "forward"), configured(op, _overrides(best), "backward"):
        winner = fa._configs_for(q)
    props = torch.cuda.get_device_properties(0)
    table_id = fa.table_for(props.major, props.minor, getattr(props, "shared_memory_per_block_optin", None))
    table = fa.load_table(fa.table_path(table_id))
    key = (fa._head_dim_pad(shape[3]), q.element_size())
    measured = ", ".join(f"{c}: {t * 1e3:.1f} us" for c, t in sorted(times.items(), key=lambda ct: ct[1]))
    source = (f"{table.source} Entry {key} (head_dim_pad, element_size) measured by gptfast lab tune on "
              f"{torch.cuda.get_device_name()} (torch {torch.__version__}, triton {triton.__version__}) at shape "
              f"{','.join(map(str, shape))} {dtype}, forward + backward: {measured}.")
    path = write or fa.table_path(table_id)
    fa.write_table(path, fa.ConfigTable(source, {**table.configs, key: winner}))
    return f"wrote the winner into {path} (entry {key})"
