"""The benchmark code itself: timing, work counts, unavailable providers, and the report's files."""

import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gptfast import kernels
from gptfast.bench import __main__ as bench_cli
from gptfast.bench import end_to_end, report
from gptfast.bench.ceilings import Ceilings
from gptfast.bench.harness import FAILED, OK, UNAVAILABLE, Record, Unavailable, failure_status, measure
from gptfast.bench.kernel_bench import KernelBench, Sweep, eager, run_case

CPU = torch.device("cpu")
FAST = dict(warmup_ms=1.0, rep_ms=5.0)


def test_wall_clock_quantiles_and_gradients_cleared():
    x = torch.ones(3, requires_grad=True)
    grads_seen = []

    def call():
        grads_seen.append(x.grad is None)
        (2 * x).sum().backward()

    median, p20, p80 = measure(call, CPU, warmup_ms=0.0, rep_ms=0.0)
    assert 0 < p20 <= median <= p80
    assert grads_seen == [True]  # no warm-up and no time asked: one timed call

    grads_seen.clear()
    measure(call, CPU, warmup_ms=0.0, rep_ms=20.0)
    assert len(grads_seen) > 1 and grads_seen[1:] == [False] * (len(grads_seen) - 1)  # they accumulate
    grads_seen.clear()
    measure(call, CPU, warmup_ms=0.0, rep_ms=20.0, grad_to_none=[x])
    assert len(grads_seen) > 1 and all(grads_seen)  # each timed call starts from no gradient
    assert torch.equal(x.grad, torch.full((3,), 2.0))  # the last call's alone
    grads_seen.clear()
    measure(call, CPU, warmup_ms=30.0, rep_ms=20.0)
    assert len(grads_seen) > 2  # warm-up calls, then timed ones


def test_cuda_goes_through_do_bench(monkeypatch):
    import triton.testing

    seen = {}

    def do_bench(fn, warmup, rep, grad_to_none, quantiles):
        seen.update(warmup=warmup, rep=rep, grad_to_none=grad_to_none, quantiles=quantiles)
        return [2.0, 1.0, 3.0]

    monkeypatch.setattr(triton.testing, "do_bench", do_bench)
    x = torch.ones(1, requires_grad=True)
    assert measure(lambda: None, torch.device("cuda"), warmup_ms=5.0, rep_ms=7.0, grad_to_none=[x]) == [2.0, 1.0, 3.0]
    assert seen == dict(warmup=5.0, rep=7.0, grad_to_none=[x], quantiles=[0.5, 0.2, 0.8])


def test_work_counts():
    size = dict(rows=10, hidden=7)
    assert report.KERNELS["layer_norm"].pass_work(size, "forward", 2) == (2 * 70 + 14) * 2
    assert report.KERNELS["layer_norm"].pass_work(size, "forward+backward", 2) == (2 * 70 + 14 + 3 * 70 + 21) * 2
    assert report.KERNELS["bias_gelu"].pass_work(size, "backward", 4) == (3 * 70 + 14) * 4
    logits = dict(rows=10, vocab=7)
    assert report.KERNELS["cross_entropy"].pass_work(logits, "forward+backward", 2) == 3 * 70 * 2 + 2 * 10 * 8
    attention = dict(batch=2, heads=3, seq=5, head_dim=8)
    forward = 4 * 2 * 3 * 25 * 8 / 2
    assert report.KERNELS["flash_attention"].pass_work(attention, "forward", 2) == forward
    assert report.KERNELS["flash_attention"].pass_work(attention, "forward+backward", 2) == 3.5 * forward
    cache = dict(batch=2, heads=3, k_len=5, head_dim=8)  # K and V, 5 rows each; the query and the output
    assert report.KERNELS["attention_decode"].pass_work(cache, "forward", 2) == 2 * 3 * (2 * 5 + 2) * 8 * 2
    for bench in report.KERNELS.values():  # the headline size is one of the full sweep's sizes
        assert bench.headline in bench.sizes("full")


def test_percent_of_ceiling():
    ceilings = Ceilings(copy_gbps=200.0, matmul_tflops=50.0, copy_bytes=1, matmul_size=1, matmul_dtype="float32")
    assert ceilings.percent(Record("layer_norm", "triton", "forward", {}, value=50.0, unit="GB/s")) == 25.0
    assert ceilings.percent(Record("flash_attention", "triton", "forward", {}, value=10.0, unit="TFLOP/s")) == 20.0
    train = Record("train", "triton", "step", {}, value=1e5, unit="tokens/s", extra={"model_tflops": 5.0})
    assert ceilings.percent(train) == 10.0  # the MFU
    assert ceilings.percent(Record("generate", "triton", "cache", {}, value=1e3, unit="tokens/s")) is None
    assert ceilings.percent(Record("layer_norm", "liger", "forward", {}, status=UNAVAILABLE, unit="GB/s")) is None


def _bench(providers: dict) -> KernelBench:
    return KernelBench(
        name="double", unit="GB/s", full=[], small=[Sweep("s", "n", [dict(n=1000)])], headline=dict(n=1000),
        providers=providers,
        make_inputs=lambda size, device, dtype: (torch.randn(size["n"], device=device, dtype=dtype,
                                                             requires_grad=True),),
        work=lambda size, elem: (2.0 * size["n"] * elem, 3.0 * size["n"] * elem))


def _refuse(message):
    def factory(device):
        raise Unavailable(message)
    return factory


def _broken(*args):
    raise ZeroDivisionError("a bug")


def _bench_test_op(x):
    """An operation whose kernel takes nothing (the test registers its check)."""
    return x


def _refused_by_the_switch(x):
    with kernels.use_backend("triton"):
        kernels.backend.route(_bench_test_op, x)
    return x


@pytest.mark.parametrize("pass_", ["forward", "backward", "forward+backward"])
def test_run_case_measures_every_pass(pass_):
    record = run_case(_bench({"torch": eager(lambda x: 2 * x)}), "torch", pass_, dict(n=1000), CPU,
                      torch.float32, **FAST)
    assert record.status == OK, record.note
    work = {"forward": 2, "backward": 3, "forward+backward": 5}[pass_] * 1000 * 4
    assert record.value > 0 and math.isclose(record.value, work / (record.ms * 1e-3) / 1e9)
    assert 0 < record.p20_ms <= record.ms <= record.p80_ms and record.first_call_s > 0
    assert record.peak_mb is None  # peak memory is a CUDA figure


def test_run_case_records_what_cannot_run(monkeypatch):
    monkeypatch.setitem(kernels.backend._CHECKS, _bench_test_op, lambda x: "no kernel takes this")
    bench = _bench({"missing": _refuse("no such library"), "buggy": eager(_broken),
                    "refused": eager(_refused_by_the_switch)})
    missing = run_case(bench, "missing", "forward", dict(n=1000), CPU, torch.float32, **FAST)
    assert (missing.status, missing.note, missing.value) == (UNAVAILABLE, "no such library", None)
    buggy = run_case(bench, "buggy", "backward", dict(n=1000), CPU, torch.float32, **FAST)
    assert buggy.status == FAILED and buggy.note == "ZeroDivisionError: a bug"
    refused = run_case(bench, "refused", "forward+backward", dict(n=1000), CPU, torch.float32, **FAST)
    assert refused.status == UNAVAILABLE and "bench_test_op: the 'triton' backend cannot run" in refused.note


@pytest.fixture(scope="module")
def results():
    settings = report.Settings(groups=("layer_norm",), sizes="small", providers=("torch", "liger"), **FAST)
    return report.run(settings, CPU, command="python -m gptfast.bench --test", progress=False)


def test_run_results(results):
    assert results["device"]["slug"] == "cpu" and results["versions"]["torch"] == torch.__version__
    assert results["ceilings"]["copy_gbps"] > 0 and results["ceilings"]["matmul_tflops"] > 0
    records = results["records"]
    assert {(r["provider"], r["status"]) for r in records} == {("torch", OK), ("liger", UNAVAILABLE)}
    measured = [r for r in records if r["status"] == OK]
    assert all(0 < r["p20_ms"] <= r["ms"] <= r["p80_ms"] and r["pct_of_ceiling"] > 0 for r in measured)
    assert len(records) == 2 * 2 * 3  # providers x small sizes x passes
    json.dumps(results)  # JSON-ready as it is


def test_write_report_files(results, tmp_path):
    paths = report.write(results, tmp_path)
    assert sorted(p.name for p in paths) == ["layer_norm.png", "results.json", "results.md"]
    assert json.loads((tmp_path / "results.json").read_text()) == json.loads(json.dumps(results))
    text = (tmp_path / "results.md").read_text()
    assert "| size | pass | torch | liger | triton / torch |" in text
    assert "| rows=24 hidden=300 | backward |" in text
    assert "layer_norm / liger (unavailable): Liger-Kernel runs on CUDA only" in text
    assert (tmp_path / "layer_norm.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_decode_attention_times_the_forward_alone(tmp_path):
    settings = report.Settings(groups=("attention_decode",), sizes="small", providers=("triton", "sdpa-math"), **FAST)
    results = report.run(settings, CPU, command="python -m gptfast.bench --test", progress=False)
    records = results["records"]
    assert [(r["provider"], r["pass_"], r["status"]) for r in records] == [
        (provider, "forward", OK) for _ in range(2) for provider in ("triton", "sdpa-math")]
    assert all(r["unit"] == "GB/s" and r["pct_of_ceiling"] > 0 for r in records)
    report.write(results, tmp_path)
    text = (tmp_path / "results.md").read_text()
    assert "| batch=1 heads=2 k_len=40 head_dim=16 | forward |" in text and "| backward |" not in text
    assert (tmp_path / "attention_decode.png").exists()


def test_without_matplotlib_the_tables_are_still_written(results, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # its import now fails, as when it is missing
    paths = report.write(results, tmp_path)
    assert sorted(p.name for p in paths) == ["results.json", "results.md"]
    assert (tmp_path / "results.md").read_text().startswith("# Benchmark results")
    assert not list(tmp_path.glob("*.png"))
    said = capsys.readouterr().err.splitlines()
    assert said == [report.NO_MATPLOTLIB] and "pip install 'gptfast-triton[bench]'" in said[0]


def test_budget_skips_the_rest():
    settings = report.Settings(groups=("bias_gelu",), sizes="small", providers=("torch",), budget_s=0.0, **FAST)
    results = report.run(settings, CPU, command="", progress=False)
    assert results["records"] and all(r["status"] == UNAVAILABLE and "skipped: out of time" in r["note"]
                                      for r in results["records"])


def test_results_dir_and_latest(results, tmp_path):
    first = report.results_dir(CPU, tmp_path)
    assert first.name.endswith("-cpu") and first.name[:4].isdigit()
    report.write(results, first, plots=False)
    second = report.results_dir(CPU, tmp_path)
    assert second.name == first.name + "-2"
    assert report.latest_results(tmp_path) is None  # CPU results are never the README's
    gpu = dict(results, device=dict(results["device"], type="cuda"))
    report.write(gpu, tmp_path / "gpu-early", plots=False)
    report.write(dict(gpu, started="2999-01-01T00:00:00+00:00"), tmp_path / "gpu-late", plots=False)
    assert report.latest_results(tmp_path) == tmp_path / "gpu-late" / "results.json"


def test_results_written_after_every_case(tmp_path):
    """A run stopped from outside (here at its third case) leaves readable results.json and results.md."""
    settings = report.Settings(groups=("bias_gelu",), sizes="small", providers=("torch",), **FAST)
    todo = report.tasks(settings, CPU)

    def stopped():
        raise KeyboardInterrupt

    todo[2] = dataclasses.replace(todo[2], measure=stopped)
    results = report.begin(settings, CPU, command="")
    with pytest.raises(KeyboardInterrupt):
        report.measure_tasks(results, todo, out_dir=tmp_path / "run", progress=False)
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert not saved["finished"] and len(saved["records"]) == 2 and saved["records"] == results["records"]
    assert "partial results" in (tmp_path / "run" / "results.md").read_text()


def test_update_readme_between_markers(results, tmp_path):
    out = tmp_path / "bench" / "results" / "run"
    report.write(results, out, plots=False)
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{report.README_START}\nold table\n{report.README_END}\noutro\n")
    report.update_readme(readme, out / "results.json")
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith(f"{report.README_END}\noutro\n")
    assert "old table" not in text and "`bench/results/run/results.md`" in text
    assert "Command: `python -m gptfast.bench --test`" in text
    readme.write_text("no markers\n")
    with pytest.raises(ValueError, match="lacks the markers"):
        report.update_readme(readme, out / "results.json")


def test_cli(tmp_path, capsys):
    assert bench_cli.main(["--readme-from", "--results-root", str(tmp_path)]) == 1
    assert "no results" in capsys.readouterr().err
    argv = ["--group", "bias_gelu", "--provider", "torch", "--sizes", "small", "--no-plots",
            "--warmup-ms", "1", "--rep-ms", "5", "--out", str(tmp_path / "run")]
    assert bench_cli.main(argv) == 0
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["command"].startswith("python -m gptfast.bench --group bias_gelu")
    assert "## bias_gelu (GB/s, % of ceiling)" in capsys.readouterr().out
    (tmp_path / "run" / "results.md").unlink()
    assert bench_cli.main(["--render", str(tmp_path / "run" / "results.json")]) == 0
    assert (tmp_path / "run" / "results.md").exists() and (tmp_path / "run" / "bias_gelu.png").exists()
    with pytest.raises(SystemExit):
        bench_cli.main(["--group", "nonsense"])


@pytest.mark.parametrize("error, status, note", [
    (Unavailable("no flash backend"), UNAVAILABLE, "no flash backend"),
    (kernels.BackendError("cannot run"), UNAVAILABLE, "cannot run"),
    (ImportError("no module named liger_kernel"), UNAVAILABLE, "no module named liger_kernel"),
    (torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 17 GiB"), UNAVAILABLE, "out of memory"),
    (torch._dynamo.exc.TorchDynamoException("inductor broke\ndetails"), UNAVAILABLE,
     "torch.compile failed: TorchDynamoException: inductor broke"),
    (ValueError("bad shape"), FAILED, "ValueError: bad shape"),
])
def test_failure_status(error, status, note):
    assert failure_status(error) == (status, note)


def test_readme_summary_and_targets(results):
    """Synthetic full-size records: the headline kernel row, the training table and the targets."""
    full = end_to_end.TRAIN_SIZES["full"].as_dict()
    tokens = {"triton": 300_000, "torch": 180_000, "triton+compile": 480_000, "torch+compile": 290_000}
    records = [Record("train", p, "step", full, value=v, unit="tokens/s", pct_of_ceiling=40.0, first_call_s=2.0)
               for p, v in tokens.items()]
    headline = report.KERNELS["layer_norm"].headline
    records += [Record("layer_norm", "triton", "forward+backward", headline, value=2400.0, pct_of_ceiling=80.0),
                Record("layer_norm", "torch", "forward+backward", headline, value=1200.0, pct_of_ceiling=40.0),
                Record("layer_norm", "liger", "forward+backward", headline, status=UNAVAILABLE, note="missing")]
    cache = report.KERNELS["attention_decode"].headline  # timed forward alone
    records += [Record("attention_decode", p, "forward", cache, value=v, pct_of_ceiling=v / 40) for p, v in
                (("triton", 2000.0), ("sdpa-flash", 1000.0))]
    synthetic = dict(results, records=[r.to_dict() for r in records])
    text = report.readme_table(synthetic, "bench/results/x/results.md")
    assert "| layer_norm (GB/s, forward+backward) | rows=16384 hidden=768 | 2,400 (80%) | torch 1,200 (40%), " \
           "liger n/a |" in text
    assert "| attention_decode (GB/s, forward) | batch=1 heads=12 k_len=1024 head_dim=64 | 2,000 (50%) | " \
           "sdpa-flash 1,000 (25%) |" in text
    assert "| triton+compile | step | 480,000 | 2.67x | 40% | | 2.0 s |" in text.replace("  ", " ")
    assert "- triton / torch: 1.67x (target 1.5x: met)" in text
    assert "- triton / torch+compile: 1.03x (target 1.1x: missed)" in text
    assert "- triton+compile: 480,000 tokens/s (target 500,000: missed)" in text


def test_plain_pytest_skips_the_benchmark_suite():
    suite = Path(__file__).with_name("test_benchmarks.py")
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", str(suite),
                          "-k", "train"], capture_output=True, text=True, cwd=suite.parents[1])
    assert run.returncode == 0, run.stdout + run.stderr
    skipped = f"{len(end_to_end.TRAIN_PROVIDERS)} skipped"  # each training provider's step
    assert skipped in run.stdout and "run it with pytest --benchmark" in run.stdout


def test_unknown_groups_and_providers_are_refused():
    with pytest.raises(ValueError, match=r"unknown groups \['nonsense'\]"):
        report.run(report.Settings(groups=("nonsense",)), CPU, command="", progress=False)
    with pytest.raises(ValueError, match=r"unknown providers \['cudnn'\]: choose from triton, triton/unfused-head"):
        report.run(report.Settings(providers=("cudnn",)), CPU, command="", progress=False)


def test_peak_memory_table(results):
    size = report.KERNELS["flash_attention"].headline
    records = [Record("flash_attention", p, "forward+backward", size, value=300.0, peak_mb=mb)
               for p, mb in (("triton", 1536.0), ("sdpa-math", 20480.0))]
    records.append(Record("flash_attention", "sdpa-flash", "forward+backward", size, status=UNAVAILABLE, note="x"))
    text = report.markdown(dict(results, records=[r.to_dict() for r in records],
                                settings=dict(results["settings"], sizes="full")))
    assert "| size | triton | sdpa-math |" in text
    assert "| batch=16 heads=32 seq=1024 head_dim=64 | 1,536 | 20,480 |" in text
    assert "Peak memory" not in report.markdown(results)  # CPU runs record none


def test_a_forward_of_several_outputs_gets_a_gradient_for_each():
    """add_layer_norm's providers return (x + branch, LayerNorm of it): the backward sends both gradients."""
    bench = report.KERNELS["add_layer_norm"]
    size = bench.sizes("small")[0]
    for provider in ("triton", "torch"):
        for pass_ in bench.passes:
            record = run_case(bench, provider, pass_, size, CPU, torch.float32, **FAST)
            assert record.status == OK, (provider, pass_, record.note)
