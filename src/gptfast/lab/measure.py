"""``lab bench`` and ``lab tune``: measurements, on a GPU only (the CLI refuses without one).

bench: the op's benchmark (the first ``KernelBench`` of its spec: our kernel, eager, torch.compile, SDPA
and Liger where installed) at one size, forward, backward and both, timed by ``triton.testing.do_bench``
through the bench harness, each with its percentage of the measured copy or matmul ceiling.
tune: the candidate configurations (``--config``, each one candidate) that ``inspect`` finds
spill-free and unserialised on this GPU, each timed forward + backward through the op's launchers,
which take the candidate's configurations; for attention the fastest goes into this GPU's table
(gptfast/kernels/configs/flash_attention_sm<table>.json, or ``--write FILE``) with the device, versions
and times.
"""

from __future__ import annotations

from pathlib import Path

import torch

from gptfast.kernels.spec import OpSpec

from . import analysis
from .ops import check_inputs, check_overrides, parse_config, parse_shape
from .targets import Architecture, target_for_device


def local_architecture() -> Architecture:
    """This GPU's target (``targets.target_for_device``)."""
    props = torch.cuda.get_device_properties(0)
    return target_for_device(props.name, (props.major, props.minor), props.multi_processor_count, props.total_memory)


def bench(op: OpSpec, shape_text: str | None, dtype: str) -> str:
    from gptfast.bench.ceilings import measure_ceilings
    from gptfast.bench.kernel_bench import PASSES, run_case

    device = torch.device("cuda")
    ceilings = measure_ceilings(device)
    benchmark = op.benchmarks[0]
    shape = parse_shape(op, shape_text)
    check_inputs(op, shape, dtype, {})
    size = benchmark.size_for(shape)
    lines = [f"{op.name} {size} {dtype} on {torch.cuda.get_device_name()}, the lab's target "
             f"{local_architecture().name} (measured, do_bench median; copy "
             f"{ceilings.copy_gbps:.0f} GB/s, matmul {ceilings.matmul_tflops:.0f} TFLOP/s)"]
    for provider in benchmark.providers:
        for pass_ in PASSES:
            r = run_case(benchmark, provider, pass_, size, device, analysis.DTYPES[dtype])
            pct = ceilings.percent(r)
            figure = (f"{r.ms * 1e3:9.1f} us  {r.value:8.1f} {r.unit}" + (f"  {pct:5.1f}% of ceiling" if pct else "")
                      if r.status == "ok" else f"{r.status}: {r.note}")
            lines.append(f"{provider:<14} {pass_:<17} {figure}")
    return "\n".join(lines)


def tune(op: OpSpec, shape_text: str | None, dtype: str, candidates: list[str] | None,
         write: Path | None = None) -> str:
    """Time each candidate configuration (``--config`` texts; default: the op's ``tune_candidates``)
    that inspect finds spill-free and unserialised here: the op's launchers, forward then backward, on
    the benchmark's inputs with the candidate's configurations passed to them. The fastest goes into the
    op's table (``OpSpec.save_tuned``), if it has one."""
    import triton

    from gptfast.bench.harness import measure

    candidates = candidates or list(op.tune_candidates)
    if not candidates:
        raise ValueError(f"lab tune: {op.name} has no default candidates: give them with --config (one each)")
    variant = [c for c in candidates if any(k.endswith(("_masked", "_dropout")) for k in _overrides(c))]
    if variant:  # tune times the default variant (no dropout or key_start): never these entries
        raise ValueError(f"lab tune: {variant[0]!r}: tune times attention without dropout or key_start only")
    for candidate in candidates:
        check_overrides(op, _overrides(candidate))
    arch, shape, torch_dtype = local_architecture(), parse_shape(op, shape_text), analysis.DTYPES[dtype]
    requests = [analysis.Request(op, shape, dtype, arch, _overrides(c), {}) for c in candidates]
    device = torch.device("cuda")
    size = op.benchmarks[0].size_for(shape)
    inputs = op.inputs(shape, torch_dtype, device, {}, torch.Generator().manual_seed(0))
    lines = [f"{op.name} {size} {dtype} on {torch.cuda.get_device_name()}: forward + backward, measured"]
    times = {}
    for candidate, (report, _) in zip(candidates, analysis.inspect_many(requests)):
        bad = [k["name"] for k in report["kernels"] if k["spill_bytes"] or k["serialized_mma"]]
        if bad:
            lines.append(f"{candidate:<50} skipped: spills or serialised wgmma in {', '.join(bad)}")
            continue
        times[candidate] = measure(lambda c=candidate: op.launch(inputs, _overrides(c)), device)[0]
        lines.append(f"{candidate:<50} {times[candidate] * 1e3:9.1f} us")
    if not times:
        return "\n".join(lines + ["no candidate ran: nothing to write"])
    best = min(times, key=times.get)
    lines.append(f"fastest: {best} ({times[best] * 1e3:.1f} us)")
    if op.save_tuned is None:  # the row ops derive their blocks from the row length: there is no table to write
        lines.append(f"{op.name} has no configuration table: its launcher derives the blocks from the row length")
        return "\n".join(lines)
    measured = ", ".join(f"{c}: {t * 1e3:.1f} us" for c, t in sorted(times.items(), key=lambda ct: ct[1]))
    note = (f"measured by gptfast lab tune on {torch.cuda.get_device_name()} (torch {torch.__version__}, triton "
            f"{triton.__version__}) at shape {','.join(map(str, shape))} {dtype}, forward + backward: {measured}.")
    lines.append(op.save_tuned(shape, torch_dtype, _overrides(best), note, write))
    return "\n".join(lines)


def _overrides(candidate: str) -> dict[str, dict[str, int]]:
    return {} if candidate == "shipped" else parse_config([candidate])
