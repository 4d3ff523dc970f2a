"""bench/gpu.sh, the benchmark run for a GPU rented by the minute: its plan fits the job it is made for (510 s
of stage budgets within a 540 s limit; at most 8 files of 16 MiB in $OUT, two folders deep), it is rehearsed on
a CPU (``--rehearse``), and a run killed mid-way leaves results that read."""

import importlib
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from gptfast.bench import report

REPO = Path(__file__).resolve().parents[1]
# The run's scripts are the checkout's, not the package's: they import each other from bench/, as
# `python bench/gpu_run.py` does (its folder first on sys.path).
sys.path.insert(0, str(REPO / "bench"))
import gpu_run as gpu  # noqa: E402
import gpu_run_prepare  # noqa: E402
import gpu_run_smoke  # noqa: E402

# The plan's order: versions, ceilings, the smoke, training (eager, with activation checkpointing, with
# each kernel choice changed, then compiled), generation, the kernels' headline sizes, tuning, the other
# sizes; then the packing.
ORDER = ("versions", "ceilings", "smoke", "train", "train-ac", "train-choices", "train-compile", "generate",
         "kernels-headline", "tune", "kernels-rest", "pack")
RETURNABLE_NAME = re.compile(r"[A-Za-z0-9._-]+")


def start_rehearsal(out: Path) -> subprocess.Popen:
    env = dict(os.environ, OUT=str(out), PYTHON=sys.executable)
    env.pop("TRITON_INTERPRET", None)  # gpu.sh sets it itself
    return subprocess.Popen(["bash", "bench/gpu.sh", "--rehearse"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def assert_returnable(out: Path) -> None:
    """What the run may leave, easy to copy back: at most 8 plain files, 16 MiB each, two folders down, plain names."""
    found = list(out.rglob("*"))
    files = [p for p in found if p.is_file()]
    assert len(files) <= gpu.MAX_FILES, sorted(p.name for p in files)
    for path in found:
        relative = path.relative_to(out)
        assert not path.is_symlink() and all(RETURNABLE_NAME.fullmatch(part) for part in relative.parts), relative
        if path.is_file():
            assert path.stat().st_size <= gpu.MAX_FILE_BYTES, relative
            assert len(relative.parts) - 1 <= gpu.MAX_DEPTH, relative


def test_stages_follow_the_issue_and_fit_510_seconds():
    assert gpu.STAGE_NAMES == ORDER
    assert sum(stage.budget_s for stage in gpu.STAGES) <= gpu.TOTAL_BUDGET_S == 510
    assert dict((s.name, s.budget_s) for s in gpu.STAGES)["smoke"] <= 90
    assert all(s.budget_s >= gpu.MIN_STAGE_S and s.rehearsal_s >= gpu.MIN_STAGE_S for s in gpu.STAGES)
    assert len(gpu.OUTPUTS) <= gpu.MAX_FILES


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-out")
    process = start_rehearsal(out)
    log, _ = process.communicate(timeout=400)
    assert process.returncode == 0, log[-3000:]
    return out, log


def test_rehearsal_prints_the_budgets_and_fits_the_return_limits(rehearsal):
    out, log = rehearsal
    for stage in gpu.STAGES:
        assert re.search(rf"^{stage.name} +{stage.rehearsal_s:.0f} s +pending$", log, re.M), stage.name
    assert re.search(rf"^total +{sum(s.rehearsal_s for s in gpu.STAGES):.0f} s", log, re.M)
    assert_returnable(out)
    assert {p.name for p in out.iterdir()} <= set(gpu.OUTPUTS)
    assert (out / "gpu.log").read_text().strip() == log.strip()


def test_rehearsal_records_every_stage_and_its_results(rehearsal):
    out, _ = rehearsal
    stages = json.loads((out / "stages.json").read_text())
    assert [s["name"] for s in stages["stages"]] == list(ORDER)
    assert stages["total_budget_s"] == sum(s.rehearsal_s for s in gpu.STAGES)
    for stage in stages["stages"]:  # each ran (or was cut at its limit), none left pending
        assert stage["status"] == "ok" or stage["status"].startswith(("stopped at its", "skipped")), stage
        assert stage["status"].startswith("skipped") or stage["used_s"] <= stage["limit_s"] + 2 * gpu.KILL_GRACE_S
    assert stages["stages"][0]["result"]["versions"]["torch"]
    smoke = json.loads((out / "smoke.json").read_text())
    assert smoke["passed"] >= 1 and smoke["failed"] == smoke["error"] == 0, smoke
    assert all(c["status"] != "pending" for c in smoke["cases"])
    results = json.loads((out / "results.json").read_text())
    groups = {r["group"] for r in results["records"]}
    assert {"train", "generate", "layer_norm"} <= groups and results["ceilings"]["copy_gbps"] > 0
    assert results["lab_target"] is None  # on a CPU no target of the lab's; on a GPU its target (below)
    for record in results["records"]:
        assert record["status"] in ("ok", "unavailable", "failed") and (record["status"] == "ok") == (
            record["value"] is not None)
    with tarfile.open(out / "report.tar.gz") as tar:
        names = tar.getnames()
    folder = names[0].split("/")[0]
    assert {f"{folder}/results.json", f"{folder}/results.md", f"{folder}/smoke.json"} <= set(names)


def test_the_rehearsal_skips_no_stage_for_budget(rehearsal):
    """The rehearsal exists to exercise every stage: each one's process ran (a loaded machine may stop one
    at its limit), and the tune stage began a `lab tune` for each op with default candidates (at its small
    shape; on a CPU it says it needs a GPU, in seconds)."""
    from gptfast.kernels.registry import SPECS

    out, _ = rehearsal
    stages = {s["name"]: s for s in json.loads((out / "stages.json").read_text())["stages"]}
    for stage in stages.values():
        assert not stage["status"].startswith("skipped"), stage
    runs = stages["tune"]["result"]["runs"]
    assert [(r["op"], r["shape"]) for r in runs] == [(s.name, ",".join(map(str, s.shapes.small)))
                                                      for s in SPECS.values() if s.tune_candidates]
    assert runs and not any(r["status"].startswith("skipped") for r in runs), runs


def test_the_rehearsal_budgets_leave_the_tune_stage_a_run():
    """Its own deadline (the budget less the kill grace) less the reserve leaves `lab tune` more than the
    floor below which it is not started: the stage's process starts in seconds, as does `lab tune`'s."""
    tune = dict((s.name, s.rehearsal_s) for s in gpu.STAGES)["tune"]
    assert tune - gpu.KILL_GRACE_S - gpu.RESERVE_S >= 2 * gpu.MIN_STAGE_S + 3


def test_the_tune_stage_tunes_each_op_with_candidates_and_restores_the_installed_tables(tmp_path, monkeypatch):
    """`lab tune` (faked: it rewrites a table) at each tuned op's GPT-2 shape; the tables it changed go into
    tuned.tar.gz, and the folder the installed package reads them from gets the shipped ones back."""
    from gptfast.kernels.registry import SPECS

    flash_attention = importlib.import_module("gptfast.kernels.flash_attention")  # the package, not its function
    tables = tmp_path / "configs"
    tables.mkdir()
    (tables / "a.json").write_text('{"shipped": 1}\n')
    (tables / "b.json").write_text('{"shipped": 2}\n')
    monkeypatch.setattr(flash_attention, "CONFIG_DIR", tables)
    commands = []

    def lab_tune(command, **kwargs):
        commands.append(command[command.index("tune") + 1:])
        (tables / "a.json").write_text('{"tuned": 1}\n')
        return subprocess.CompletedProcess(command, 0, "wrote the winner", "")

    monkeypatch.setattr(gpu.subprocess, "run", lab_tune)
    (tmp_path / "out").mkdir()
    (tmp_path / "work").mkdir()
    ctx = gpu.Context(out=tmp_path / "out", work=tmp_path / "work", rehearse=False, deadline=time.time() + 60)
    found = gpu._tune(ctx)
    wanted = [s for s in SPECS.values() if s.tune_candidates]
    assert commands == [[s.name, "--shape", ",".join(map(str, s.shapes.default))] for s in wanted] and wanted
    assert found["tables_written"] == ["a.json"]
    assert [r["status"] for r in found["runs"]] == ["ok"] * len(wanted)
    assert (tables / "a.json").read_text() == '{"shipped": 1}\n'
    with tarfile.open(ctx.out / "tuned.tar.gz") as tar:
        assert tar.extractfile("configs/a.json").read() == b'{"tuned": 1}\n'
        assert "configs/b.json" not in tar.getnames()


def _session_processes(session: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == session:  # the session id, after state, parent and group
            found.append(int(stat.parent.name))
    return found


def test_the_headline_stage_takes_every_size_with_a_target(tmp_path):
    """On a GPU the kernels' headline stage times each headline size and each size with a target of its own
    (attention's long-sequence forward, the decode headline); the later stage the other sizes."""
    ctx = gpu.Context(out=tmp_path, work=tmp_path, rehearse=False, deadline=0.0)
    early, late = ({(t.group, json.dumps(t.size)) for t in gpu._kernel_tasks(ctx, headline=first)}
                   for first in (True, False))
    wanted = {(name, json.dumps(size)) for name, bench in report.KERNELS.items()
              for size in (bench.headline, *bench.targets)}
    assert early == wanted and not early & late
    assert ("flash_attention", json.dumps(dict(batch=2, heads=16, seq=8192, head_dim=128))) in early
    assert {group for group, _ in early} >= {"flash_attention", "attention_decode"}


def test_the_smoke_takes_every_registered_op_at_its_odd_shapes():
    """On the GPU every op of the registry at each odd shape in each dtype, and the model's step in each,
    one process per op and dtype; the rehearsal each op's first odd shape (bfloat16 listed, skipped) in
    two processes, the ops' and the model's."""
    from gptfast.kernels.registry import SPECS

    cases = gpu_run_smoke.plan(rehearse=False)
    ops = {(c.op, c.shape, c.dtype) for c in cases if c.op != gpu_run_smoke.MODEL}
    assert ops == {(name, tuple(shape), dtype) for name, spec in SPECS.items() for shape in spec.shapes.odd
                   for dtype in ("float32", "float16", "bfloat16")}
    assert [c.dtype for c in cases if c.op == gpu_run_smoke.MODEL] == ["float32", "float16", "bfloat16"]
    assert all(c.group == f"{c.op}-{c.dtype}" for c in cases) and len({c.name for c in cases}) == len(cases)
    rehearsal = gpu_run_smoke.plan(rehearse=True)
    first = {name: tuple(spec.shapes.odd[0]) for name, spec in SPECS.items()} | {gpu_run_smoke.MODEL: ()}
    assert {(c.op, c.shape, c.dtype) for c in rehearsal} == {(op, shape, dtype) for op, shape in first.items()
                                                            for dtype in ("float32", "bfloat16")}
    assert {c.group for c in rehearsal} == {"ops", gpu_run_smoke.MODEL}


def test_the_smoke_checks_attention_atomic_dq_path(monkeypatch):
    """The forced path's cases: attention's backward run as beyond its dQ workspace with deterministic=False
    (the atomic dQ path) in every dtype on the GPU, in float32 in the rehearsal; its check passes here."""
    import torch

    fa_launch = importlib.import_module("gptfast.kernels.flash_attention.launch")
    forced = [c for c in gpu_run_smoke.plan(rehearse=False) if c.path]
    assert [(c.op, c.path, c.dtype) for c in forced] == [("flash_attention", "atomic-dq", d)
                                                         for d in ("float32", "float16", "bfloat16")]
    (case,) = [c for c in gpu_run_smoke.plan(rehearse=True) if c.path]
    seen, backward = [], fa_launch.launch_backward
    monkeypatch.setattr(fa_launch, "launch_backward", lambda *args: seen.append(
        (args[11], fa_launch._no_dq_workspace.value)) or backward(*args))
    found = gpu_run_smoke.op_check(case, torch.device("cpu"))
    assert found["failures"] == [] and seen and set(seen) == {(False, True)}  # deterministic False, no workspace


def test_the_smoke_starts_the_groups_with_the_most_kernels_first():
    """The model's step (it calls several ops), then the ops by how many kernels they compile (their
    tunables), ties in the registry's order: on the GPU the first groups' processes start first."""
    from gptfast.kernels.registry import SPECS

    order = list(dict.fromkeys(c.op for c in gpu_run_smoke.plan(rehearse=False)))
    assert order[0] == gpu_run_smoke.MODEL and sorted(order[1:], key=list(SPECS).index) == list(SPECS)
    for first, then in zip(order[1:], order[2:]):
        kernels = len(SPECS[first].tunables), len(SPECS[then].tunables)
        assert kernels[0] > kernels[1] or (kernels[0] == kernels[1] and list(SPECS).index(first) < list(
            SPECS).index(then)), (first, then)


def test_the_model_checks_bound_is_in_each_precisions_machine_epsilon():
    """float32 on a GPU is TF32's where an op multiplies in it (attention), as the lab's check has it."""
    import torch

    from gptfast.kernels.common import TF32_EPS
    from gptfast.kernels.registry import SPECS

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert gpu_run_smoke.epsilon("float32", cpu) == torch.finfo(torch.float32).eps == 2.0**-23
    assert gpu_run_smoke.epsilon("float32", cuda) == (TF32_EPS if any(s.tf32 for s in SPECS.values()) else 2.0**-23)
    for dtype in ("float16", "bfloat16"):
        assert gpu_run_smoke.epsilon(dtype, cuda) == gpu_run_smoke.epsilon(dtype, cpu) == torch.finfo(
            getattr(torch, dtype)).eps
    assert gpu_run_smoke.MODEL_EPSILONS * torch.finfo(torch.bfloat16).eps == 2.0**-3  # 32 of its unit roundoffs


def test_the_cache_preparation_captures_the_smokes_and_the_benchmarks_launches():
    """What bench/gpu_run_prepare.py compiles: every op's launches at the smoke's shapes and dtypes and at its
    benchmark shapes in bf16, as the launchers make them for the target GPU, none refused."""
    from gptfast.kernels.registry import SPECS

    cases = gpu_run_prepare.wanted()
    smoke = [(c.op, c.shape, c.dtype) for c in gpu_run_smoke.plan(rehearse=False) if c.op != gpu_run_smoke.MODEL]
    assert set(smoke) <= set(cases)
    assert {(name, tuple(shape)) for name, spec in SPECS.items() for shape in spec.shapes.bench} == {
        (op, shape) for op, shape, dtype in cases if (op, shape, dtype) not in smoke and dtype == "bfloat16"}
    launches, refused = gpu_run_prepare.capture(cases)
    assert refused == [] and len(launches) >= 2 * len(cases)  # a forward and a backward each, at least


def test_a_run_killed_mid_way_leaves_readable_results(tmp_path):
    """SIGKILL to every process of the run once the smoke is under way (as a job's time limit would)."""
    process = start_rehearsal(tmp_path)
    stages_file, deadline = tmp_path / "stages.json", time.time() + 120
    try:
        while time.time() < deadline:
            stages = json.loads(stages_file.read_text()) if stages_file.exists() else {"stages": []}
            if any(s["name"] == "smoke" and s["status"] == "running" for s in stages["stages"]) and (
                    tmp_path / "smoke.json").exists():
                break
            time.sleep(0.2)
        else:
            pytest.fail("the rehearsal never reached the smoke stage")
    finally:
        for pid in _session_processes(process.pid):
            os.kill(pid, signal.SIGKILL)
        process.communicate(timeout=30)
    assert_returnable(tmp_path)
    for path in tmp_path.glob("*.json"):
        json.loads(path.read_text())  # whole files only: each is replaced, never written in place
    stages = {s["name"]: s for s in json.loads(stages_file.read_text())["stages"]}
    assert stages["versions"]["status"] == stages["ceilings"]["status"] == "ok"
    assert json.loads((tmp_path / "results.json").read_text())["ceilings"]["copy_gbps"] > 0


def test_the_run_records_the_lab_target_it_measured(tmp_path, monkeypatch):
    """On a GPU the run's results name the lab's target for it, with the numbers of its static estimates,
    and the report's header sets them beside the measured ceilings."""
    import torch

    h100 = SimpleNamespace(name="NVIDIA H100 80GB HBM3", major=9, minor=0, multi_processor_count=132,
                           total_memory=79 * 2**30)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: h100)
    monkeypatch.setattr(gpu.Context, "device", property(lambda self: torch.device("cuda")))
    target = gpu._lab_target(gpu.Context(tmp_path, tmp_path, rehearse=False, deadline=0.0))
    assert target == {"name": "h100", "part": "H100-SXM5-80GB", "arch": "sm_90", "sm_count": 132, "clock_hz": 1.83e9,
                      "bandwidth": 3.35e12, "bandwidth_source": "nominal, not measured",
                      "tensor_core_flops": pytest.approx(989.4e12, rel=1e-3)}
    (line,) = [line for line in report._target_line(target) if line]
    assert "h100" in line and "`gptfast lab inspect --target h100`" in line and "3,350 GB/s" in line, line


def test_readme_stage_table_is_the_plan():
    text = (REPO / "README.md").read_text(encoding="utf-8")
    rows = re.findall(r"^\| ([a-z-]+) \| (\d+) s \|", text, re.M)
    assert [(s.name, f"{s.budget_s:.0f}") for s in gpu.STAGES] == rows
