"""The kernel lab (gptfast.lab): inspect's JSON for every op on sm_80 and sm_90, its SASS and
occupancy arithmetic, --config, dump, check under the interpreter, the main-loop baseline, and
bench / tune refusing without a GPU.

Compilation runs in subprocesses without TRITON_INTERPRET (gptfast.lab.compiler); the reports of
every op at its GPT-2 shape are compiled once for the module.
"""

import importlib
import json
import os
import subprocess
import sys

import pytest
import torch

from gptfast import lab
from gptfast.kernels import common
from gptfast.kernels.registry import SPECS
from gptfast.lab import analysis, baseline, check, ops, sass, targets

layer_norm = importlib.import_module("gptfast.kernels.layer_norm")  # the modules, not the public ops
flash_attention = importlib.import_module("gptfast.kernels.flash_attention")

pytest.importorskip("triton.backends.nvidia", reason="needs Triton's NVIDIA backend (ptxas)")

KERNEL_FIELDS = {"name", "config", "registers", "spill_bytes", "shared_memory", "ctas_per_sm", "warps_per_sm",
                 "occupancy_limit", "programs", "sm_count", "serialized_mma", "load_bits", "store_bits", "tma",
                 "main_loop_instructions", "elements_per_iteration", "mufu_per_element", "estimate_us"}
ROW_OPS = tuple(name for name, spec in SPECS.items() if spec.shape_names[0] == "rows")
TRITON = tuple(int(part) for part in analysis.triton_version().split(".")[:2])
# Triton 3.6's interpreter cannot take loop bounds computed from program ids (setup.py's test extra).
runs_kernels = pytest.mark.skipif(not torch.cuda.is_available() and TRITON < (3, 7),
                                  reason="this Triton's interpreter cannot run the kernels")


@pytest.fixture(scope="module")
def baseline_reports() -> list[dict]:
    """inspect of the baseline's requests: every op at its GPT-2 shape in bf16 for sm_80 and sm_90, with
    uniform dtypes and, where they differ, as training passes them."""
    return [report for report, _ in lab.inspect_many(baseline.baseline_requests())]


@pytest.fixture(scope="module")
def reports(baseline_reports) -> dict[tuple[str, int], dict]:
    """The uniform-dtype ones: {(op, arch): report}."""
    return {(r["op"], int(r["arch"][3:])): r for r in baseline_reports if r["inputs"] == "uniform"}


def test_inspect_json_schema(reports):
    assert {op for op, _ in reports} == set(SPECS)  # every registered op is inspectable
    for (op, arch), report in reports.items():
        json.dumps(report)  # one JSON document
        assert report["op"] == op and report["arch"] == f"sm_{arch}" and report["dtype"] == "bf16"
        assert report["shape"] == list(SPECS[op].shapes.default) and report["triton_version"]
        assert len(report["kernels"]) >= 2  # forward and backward
        for k in report["kernels"]:
            assert KERNEL_FIELDS <= set(k), KERNEL_FIELDS - set(k)
            assert set(k["estimate_us"]) >= {"memory", "issue", "mufu", "tensor_core"}


def test_inspect_sanity_at_the_launchers_configs(reports):
    for (op, arch), report in reports.items():
        for k in report["kernels"]:
            where = f"{op} sm_{arch} {k['name']} {k['config']}"
            assert k["registers"] > 0 and k["spill_bytes"] == 0, where
            assert 1 <= k["ctas_per_sm"] and k["warps_per_sm"] == k["ctas_per_sm"] * k["config"]["num_warps"], where
            assert k["sm_count"] == lab.ARCHITECTURES[arch].sm_count and k["programs"] > 0, where
            assert k["main_loop_instructions"] > 0 and k["elements_per_iteration"] > 0, where
            assert k["estimate_us"]["memory"] > 0 and k["estimate_us"]["issue"] > 0, where


def test_gpt2_16_bit_rows_use_128_bit_loads(reports):
    for (op, arch), report in reports.items():
        if op in ROW_OPS:
            for k in report["kernels"]:
                assert k["load_bits"].get("128", 0) >= 1, f"{op} sm_{arch} {k['name']}: loads {k['load_bits']}"


def test_attention_uses_tensor_cores(reports):
    """The forward and the dK/dV kernel (which also computes dQ's partials at GPT-2's shape); the two small
    passes beside them (dot(dO, O) and the sum of dQ's partials) have no matmul."""
    no_matmul = ("attention_bwd_delta", "attention_bwd_dq_reduce")
    for arch, instruction in ((90, "hgmma"), (80, "hmma")):
        matmul_kernels = [k for k in reports["flash_attention", arch]["kernels"] if k["name"] not in no_matmul]
        assert [k["name"] for k in matmul_kernels] == ["attention_fwd", "attention_bwd_kv"]
        assert all(k[instruction] > 0 for k in matmul_kernels), [(k["name"], k[instruction]) for k in matmul_kernels]
        assert all(k["estimate_us"]["tensor_core"] > 0 for k in matmul_kernels)


@pytest.fixture(scope="module")
def one_query() -> list[dict]:
    """Attention over one query and 1024 keys (decoding, and its backward) on sm_90, deterministic and not."""
    op = lab.get_op("flash_attention")
    requests = [lab.Request(op, (1, 12, 1, 64, 1024), "bf16", lab.ARCHITECTURES[90], {},
                            {"deterministic": deterministic}) for deterministic in (True, False)]
    return [report for report, _ in lab.inspect_many(requests)]


def test_no_attention_kernel_serialises_wgmma(reports, one_query):
    """sm_90 at GPT-2's shape and over one query, deterministic and with atomics: with q_len == 1 Triton
    would compile the length as a constant and ptxas would serialise the dK/dV kernel's wgmma (C7515)."""
    found = [reports["flash_attention", 90], *one_query]
    kernels = [(report["shape"], k["name"]) for report in found for k in report["kernels"]]
    assert ([1, 12, 1, 64, 1024], "attention_bwd_kv") in kernels
    assert [(report["shape"], k["name"], k["serialized_notes"]) for report in found for k in report["kernels"]
            if k["serialized_mma"]] == []


def test_memory_floor_counts_each_tensor_once(reports):
    (forward,) = [k for k in reports["cross_entropy", 90]["kernels"] if k["name"] == "cross_entropy_fwd"]
    rows, cols, _ = SPECS["cross_entropy"].shapes.default
    logits, targets_, loss, stats = rows * cols * 2, rows * 8, rows * 4, rows * 8
    assert forward["bytes"] == logits + targets_ + loss + stats
    bandwidth = reports["cross_entropy", 90]["bandwidth"]  # sm_90 alone: the H100, its bandwidth not measured
    assert bandwidth == 3.35e12 and reports["cross_entropy", 90]["bandwidth_source"] == "nominal, not measured"
    assert forward["estimate_us"]["memory"] == pytest.approx(forward["bytes"] / bandwidth * 1e6)


def test_occupancy_arithmetic():
    h100 = lab.ARCHITECTURES[90]
    assert targets.occupancy(h100, 8, 255, 0) == targets.Occupancy(1, 8, "registers")  # 8 warps x 8K registers
    assert targets.occupancy(h100, 4, 32, 0) == targets.Occupancy(16, 64, "warps")
    assert targets.occupancy(h100, 1, 16, 0).limit == "blocks"
    assert targets.occupancy(h100, 4, 32, 100 * 1024) == targets.Occupancy(2, 8, "shared_memory")
    # 168 registers: 5376 per warp, 3 warps per 16K sub-partition, 12 warps per SM.
    assert targets.occupancy(h100, 4, 168, 0) == targets.Occupancy(3, 12, "registers")


def test_targets_one_table_one_clock():
    """Each target's tensor-core floor is its SMs' FLOPs per clock at the one clock of every floor, within 2%
    of its datasheet's peak; --arch alone takes its architecture's first target; --target and --arch agree."""
    assert {"h100", "h200", "a100"} <= set(lab.TARGETS) and lab.ARCHITECTURES[90] is lab.TARGETS["h100"]
    for target in lab.TARGETS.values():
        assert target.bf16_dense_flops == pytest.approx(target.datasheet_bf16_flops, rel=0.02), target.name
    h100, h200 = lab.TARGETS["h100"], lab.TARGETS["h200"]
    assert (h100.sm_count, h100.clock_hz, h100.bandwidth, h100.bandwidth_source) == (
        132, 1.83e9, 3.35e12, "nominal, not measured")
    assert (h200.bandwidth, h200.bandwidth_source, h200.nominal_bandwidth) == (4.3e12, "measured", 4.8e12)
    assert lab.parse_target(None, None) is h100 and lab.parse_target(None, "sm_80") is lab.TARGETS["a100"]
    assert lab.parse_target("h200", "sm_90") is h200
    with pytest.raises(lab.LabError, match="--target a100 is sm_80, not sm_90"):
        lab.parse_target("a100", "sm_90")


def test_a_gpu_is_its_named_target_only_when_its_numbers_agree():
    """bench/gpu.sh and lab bench record the target of the GPU they measure: an H100 SXM is h100; an H100
    PCIe (114 SMs) or an A100 40GB is "like-" its architecture's first, with its own SM count."""
    gib = 2**30
    assert targets.target_for_device("NVIDIA H100 80GB HBM3", (9, 0), 132, 79 * gib) is lab.TARGETS["h100"]
    assert targets.target_for_device("NVIDIA H200", (9, 0), 132, 140 * gib) is lab.TARGETS["h200"]
    assert targets.target_for_device("NVIDIA A100-SXM4-80GB", (8, 0), 108, 79 * gib) is lab.TARGETS["a100"]
    pcie = targets.target_for_device("NVIDIA H100 PCIe", (9, 0), 114, 79 * gib)
    assert (pcie.name, pcie.sm_count, pcie.clock_hz) == ("like-h100", 114, 1.83e9)
    assert targets.target_for_device("NVIDIA A100-SXM4-40GB", (8, 0), 108, 39 * gib).name == "like-a100"


def test_attention_tiles_split_into_masked_and_full():
    """The lab charges attention's masked tiles (the causal diagonal, the sequence ends) at their own loop
    and the full ones at the main loop's: GPT-2's causal 1024 with the forward's 128 x 64 tiles has 2 masked
    tiles per query block and 2 per earlier 128 keys full; dK/dV's 32 x 128, 4 masked per key block."""
    fa_spec = importlib.import_module("gptfast.kernels.flash_attention.spec")
    assert fa_spec.key_span_tiles(1024, 1024, 128, 64, True) == (16, 56)  # masked, full: 72 of 128 visible
    assert fa_spec.query_span_tiles(1024, 1024, 32, 128, True) == (32, 112)
    assert fa_spec.key_span_tiles(100, 1000, 64, 64, False) == (2, 30)  # keys 960..999 masked, per query block
    assert fa_spec.query_span_tiles(100, 1000, 64, 64, False) == (17, 15)  # the last key block all masked
    for q_len, k_len, bm, bn in ((1024, 1024, 128, 64), (63, 63, 16, 32), (40, 57, 16, 16)):
        assert sum(fa_spec.key_span_tiles(q_len, k_len, bm, bn, False)) == -(-q_len // bm) * -(-k_len // bn)
        assert sum(fa_spec.query_span_tiles(q_len, k_len, bm, bn, False)) == -(-q_len // bm) * -(-k_len // bn)


def test_attention_report_counts_masked_tiles_and_the_decode_loop(reports, one_query):
    """At GPT-2's shape every visible tile is counted once, masked or full, and the masked ones at a longer
    loop; decoding's main loop is its key loop, not the whole program."""
    kernels = {k["name"]: k for k in reports["flash_attention", 90]["kernels"]}
    forward = kernels["attention_fwd"]
    assert (forward["iterations"], forward["masked_iterations"]) == (192 * 56, 192 * 16)
    assert forward["masked_loop_instructions"] > forward["main_loop_instructions"]
    kv = kernels["attention_bwd_kv"]
    block_m, block_n = kv["config"]["BLOCK_M"], kv["config"]["BLOCK_N"]
    assert kv["masked_iterations"] == 192 * (1024 // block_n) * (block_n // block_m)  # the diagonal's tiles
    (decode,) = [k for k in one_query[0]["kernels"] if k["name"] == "attention_decode"]
    assert decode["main_loop"] and decode["iterations"] == 12 * 1024 // decode["config"]["BLOCK_N"]
    assert decode["main_loop_instructions"] < 1000  # its key loop (Triton 3.6: 664), not the program (2168)


def test_training_inputs_are_the_dtypes_training_passes(baseline_reports):
    """As GPT training passes them: bias_gelu's bias in float32 (a parameter under autocast), LayerNorm's
    residual stream and parameters in float32 with a bf16 output, q, k and v views of one projection."""
    found = {r["op"]: r for r in baseline_reports if r["inputs"] == "training" and r["arch"] == "sm_90"}
    assert {"layer_norm", "add_layer_norm", "bias_gelu", "flash_attention"} <= set(found)
    for op in ("bias_gelu", "add_layer_norm"):
        for k in found[op]["kernels"]:
            assert {"*fp32", "*bf16"} <= set(k["signature"].values()), (op, k["name"], k["signature"])
    uniform_gelu = {k["name"]: k for k in reports_of(baseline_reports, "bias_gelu", "uniform")["kernels"]}
    assert "*fp32" not in set(uniform_gelu["bias_gelu_fwd"]["signature"].values())


def test_fused_head_cross_entropy_moves_4_bytes_per_logit(baseline_reports):
    """The fused head's one-pass kernel reads each bf16 logit once and writes its gradient once: 4 bytes
    (the two-pass kernels: 6), in chunks of 2,624 rows of GPT-2's 16,384, 6 the same, then one of 640."""
    linear_ce = reports_of(baseline_reports, "linear_cross_entropy", "uniform")["kernels"]
    assert [k["name"] for k in linear_ce] == ["cross_entropy_one_pass"] * 2
    assert [k["launches"] for k in linear_ce] == [6, 1]
    rows, _, vocab, _ = SPECS["linear_cross_entropy"].shapes.default
    assert sum(k["bytes"] for k in linear_ce) / (rows * vocab) == pytest.approx(4, rel=1e-3)


def reports_of(found: list[dict], op: str, inputs: str) -> dict:
    return next(r for r in found if r["op"] == op and r["arch"] == "sm_90" and r["inputs"] == inputs)


SASS = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   NOP ;
""" + "".join(f"        /*{0x20 + 16 * i:04x}*/                   FADD R{i}, R{i}, R2 ;\n" for i in range(20)) + """
        /*0160*/                   MUFU.EX2 R3, R4 ;
        /*0170*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
        /*0180*/               @P0 BRA 0x20 ;
        /*0190*/                   SYNCS.PHASECHK.TRANS64 P0, [UR4], R0 ;
        /*01a0*/              @!P0 BRA 0x190 ;
        /*01b0*/                   STG.E.U16 desc[UR4][R2.64], R5 ;
        /*01c0*/                   EXIT ;
        /*01d0*/                   BRA 0x1d0;
"""


def test_sass_main_loop_by_backward_branch():
    code = sass.instructions(SASS)
    loop, loops = sass.main_loop(code)
    assert loops == [loop]  # the two-instruction wait and the trap after EXIT are not loops
    body = sass.count(code[loop.start:loop.end + 1])
    assert (body.instructions, body.mufu, dict(body.load_bits)) == (23, 1, {128: 1})
    assert dict(sass.count(code).store_bits) == {16: 1}
    assert sass.serialized_mma("ptxas info : (C7515) Potential Performance Loss: wgmma.mma_async serialized")


def test_capture_records_launches_for_the_target():
    meta = torch.device("meta")
    gpu = common.GPU(arch=90, sm_count=132, shared_memory=227 * 1024)
    with common.capture_launches() as launches, common.targeting(gpu):
        assert common.sm_count(meta) == 132 and common.target_gpu() == gpu
        SPECS["layer_norm"].launch_meta((1000, 768), torch.bfloat16, {"weight": False, "bias": False})
    assert common.target_gpu() is None and common.sm_count(meta) == 4
    assert [ops.kernel_name(launch.kernel) for launch in launches] == ["layer_norm_fwd", "layer_norm_bwd"]
    assert launches[1].grid == (min(2 * 132, 1000 // launches[1].meta["BLOCK_M"]),)


def test_config_overrides_reach_the_launch():
    op = lab.get_op("layer_norm")
    request = lab.Request(lab.get_op("layer_norm"), (64, 768), "bf16", lab.ARCHITECTURES[90],
                          ops.parse_config(["layer_norm_bwd:BLOCK_M=1,num_warps=4"]), {})
    (_, forward), (_, backward) = analysis.capture(request)
    assert (backward.meta["BLOCK_M"], backward.meta["num_warps"]) == (1, 4)
    assert forward.meta["BLOCK_M"] == layer_norm.block_config(768, backward=False).block_m
    with pytest.raises(lab.LabError, match="no configurable kernel"):
        analysis.capture(lab.Request(op, op.shapes.default, "bf16", lab.ARCHITECTURES[90],
                                     ops.parse_config(["nope:BLOCK_M=1"]), {}))
    with pytest.raises(lab.LabError, match="KERNEL:FIELD=VALUE"):
        ops.parse_config(["layer_norm_fwd:BLOCK_M"])
    with pytest.raises(lab.LabError, match="rows,columns"):
        ops.parse_shape(lab.get_op("layer_norm"), "16,a")


def test_capture_refuses_a_launcher_that_ignores_the_target(monkeypatch):
    """Attention's configurations come from a table per GPU: a launcher choosing them by the tensors'
    device ("meta": the interpreter's tiles) instead of common.target_gpu() is refused, not reported."""
    op = lab.get_op("flash_attention")
    request = lab.Request(op, op.shapes.default, "bf16", lab.ARCHITECTURES[90], {}, {})
    assert analysis.capture(request)
    spec_module = importlib.import_module("gptfast.kernels.flash_attention.spec")
    monkeypatch.setattr(spec_module, "configs_for", lambda q: flash_attention.INTERPRETER_CONFIGS)
    with pytest.raises(lab.LabError, match="ignores common.target_gpu\\(\\): it configured attention_fwd .* sm_90"):
        analysis.capture(request)


def test_options_choose_the_variant():
    """With dropout (either deterministic flag) the dK/dV kernel that writes dQ's partials takes its
    masked entry (attention_bwd_kv_dq_masked, which --config reaches), their sum follows, no dQ kernel;
    dropout or key_start the forward's entry for them (attention_fwd_masked); bad options name the op's
    variants."""
    op = lab.get_op("flash_attention")
    options = ops.parse_options(op, ["deterministic=false", "dropout_p=0.1"])
    assert options == {"deterministic": False, "dropout_p": 0.1}
    request = lab.Request(op, (2, 12, 1024, 128), "bf16", lab.ARCHITECTURES[90],
                          ops.parse_config(["attention_bwd_kv_dq_masked:BLOCK_N=32",
                                            "attention_fwd_masked:BLOCK_N=32"]),
                          options)
    launches = {ops.kernel_name(launch.kernel): launch for _, launch in analysis.capture(request)}
    assert sorted(launches) == ["attention_bwd_delta", "attention_bwd_dq_reduce", "attention_bwd_kv", "attention_fwd"]
    table = flash_attention.tuned_configs(90, 64, 2)
    assert table.forward.num_warps != table.forward_masked.num_warps
    for option, entry in (([], table.forward), (["key_start=true"], table.forward_masked),
                          (["dropout_p=0.1"], table.forward_masked)):
        plain = lab.Request(op, (2, 12, 1024, 64), "bf16", lab.ARCHITECTURES[90], {}, ops.parse_options(op, option))
        forward = next(launch for phase, launch in analysis.capture(plain) if phase == "forward")
        assert (forward.meta["BLOCK_M"], forward.meta["num_warps"]) == (entry.block_m, entry.num_warps), option
    assert launches["attention_fwd"].meta["BLOCK_N"] == 32
    kv = launches["attention_bwd_kv"]
    assert kv.meta["BLOCK_N"] == 32 and kv.meta["BLOCK_M"] == flash_attention.tuned_configs(90, 128, 2)\
        .backward_kv_dq_masked.block_m and kv.meta["DROPOUT"]
    for bad in ("deterministic=maybe", "nope=1", "dropout_p"):
        with pytest.raises(lab.LabError, match="deterministic \\(bool\\)"):
            ops.parse_options(op, [bad])


def test_dump_writes_every_stage(tmp_path):
    request = lab.Request(lab.get_op("bias_gelu"), (64, 300), "fp16", lab.ARCHITECTURES[80], {}, {})
    written = lab.dump(request, tmp_path)
    names = {p.name for p in written}
    for kernel in ("forward.bias_gelu_fwd", "backward.bias_gelu_bwd"):
        assert {f"{kernel}.{ext}" for ext in ("ttir", "ttgir", "ptx", "sass")} <= names
    assert all(p.stat().st_size > 0 for p in written)
    assert "STG" in (tmp_path / "forward.bias_gelu_fwd.sass").read_text()


def test_check_can_fail():
    bad = check.Comparison("output", error=3e-3, eager_error=1e-3, ratio=3.0)
    assert not bad.passed


def _lab(*argv: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-m", "gptfast.lab", *argv], capture_output=True, text=True, env=env,
                          timeout=300)


@pytest.mark.skipif(torch.cuda.is_available(), reason="they measure on this GPU")
def test_bench_and_tune_refuse_without_a_gpu():
    for command in ("bench", "tune"):
        result = _lab(command, "layer_norm")
        assert result.returncode == 2 and "no GPU" in result.stderr.replace("there is none", "no GPU")
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_cli_inspect_json():
    result = _lab("inspect", "bias_gelu", "--shape", "256,3072", "--arch", "sm_80", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert [k["name"] for k in report["kernels"]] == ["bias_gelu_fwd", "bias_gelu_bwd"]
    result = _lab("inspect", "layer_norm", "--shape", "12")
    assert result.returncode == 2 and "rows,columns" in result.stderr


@runs_kernels
def test_cli_check():
    result = _lab("check", "bias_gelu", "--shape", "24,100")
    assert result.returncode == 0 and "rerun bit-identical: yes" in result.stdout, result.stdout + result.stderr


def test_cli_check_refuses_a_shape_in_one_line():
    result = _lab("check", "cross_entropy", "--shape", "4,10,20")
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.strip().splitlines() == [
        "gptfast lab check: error: cross_entropy 4,10,20 float32: 20 classes in rows of 10 columns"]


def test_main_loops_within_the_baseline(baseline_reports):
    recorded = baseline.load().get(analysis.triton_version())
    if recorded is None:
        pytest.skip(f"tests/lab_baseline.json has no entries for Triton {analysis.triton_version()}")
    now = baseline.current(baseline_reports)
    assert baseline.regressions(now, recorded) == [], "run `python -m gptfast.lab baseline --write` and review"


def test_baseline_regression_can_fail():
    assert baseline.regressions({"k": 104}, {"k": 100}) and not baseline.regressions({"k": 103}, {"k": 100})
    assert baseline.regressions({"new": 1}, {})
    recorded = {"op sm_90 k_fwd C": 100}  # every kernel must be recorded, an op added since too (one line)
    assert baseline.regressions({"op sm_90 k_fwd C": 100, "op sm_90 k_bwd C": 5}, recorded)
    (missing,) = baseline.regressions({"op sm_90 k_fwd C": 100, "new_op sm_90 k C": 5, "new_op sm_80 k C": 5}, recorded)
    assert missing.startswith("new_op: no entries for Triton") and "python -m gptfast.lab baseline --write" in missing


def test_tune_default_candidates_parse():
    """`lab tune flash_attention` without --config tries the shipped table and these variations: each
    names a configurable kernel and its fields."""
    from gptfast.lab import measure

    op = lab.get_op("flash_attention")
    assert op.tune_candidates[0] == "shipped" and len(op.tune_candidates) > 1
    for candidate in op.tune_candidates:
        ops.check_overrides(op, measure._overrides(candidate))


def test_dtype_takes_either_name():
    """--dtype bfloat16 or bf16 (float16/fp16, float32/fp32): the lab's reports keep the short names."""
    names = ("bf16", "bfloat16", "float16", "fp16", "float32")
    assert [analysis.parse_dtype(name) for name in names] == ["bf16", "bf16", "fp16", "fp16", "fp32"]
    with pytest.raises(lab.LabError, match="must be one of bfloat16, float16, float32"):
        analysis.parse_dtype("int8")


@pytest.mark.parametrize("op, shape, options, message", [
    ("layer_norm", (1, 99999999999), {}, "layer_norm 1,99999999999 bf16: row length 99999999999 is outside the "
     "kernel's range 1..8192"),
    ("bias_gelu", (1, 99999999999), {}, "bias_gelu 1,99999999999 bf16: bias_gelu_fwd's grid (1, 390625000) is over "
     "CUDA's limits (x 2,147,483,647, y 65,535, z 65,535)"),
    ("flash_attention", (99999999999, 12, 1024, 64), {}, "batch x heads = 1199999999988 is over 65535"),
    ("flash_attention", (16, 12, 1024, 99999999999), {}, "head_dim 99999999999 (the kernel takes even head dims"),
    ("flash_attention", (16, 12, 1024, 64), {"dropout_p": -1.0}, "dropout_p must be in [0, 1), got -1.0"),
    ("cross_entropy", (64, 100, 100), {"z_loss": float("nan")}, "z_loss must be a finite number >= 0, got nan"),
    ("bias_gelu", (64, 100), {"approximate": "bogus"}, "approximate must be one of ('tanh', 'none')"),
])
def test_inspect_refuses_what_the_op_or_cuda_would_in_one_line(op, shape, options, message):
    """Before compiling: the op's own checks, its kernel's limits and CUDA's grid (a 69-line Triton
    traceback inside the error, or a report of a kernel that could never launch, before)."""
    request = lab.Request(lab.get_op(op), shape, "bf16", lab.ARCHITECTURES[90], {}, options)
    with pytest.raises(lab.LabError) as refused:
        analysis.capture(request)
    assert message in str(refused.value) and "\n" not in str(refused.value)


@pytest.mark.parametrize("config, rule", [("layer_norm_fwd:BLOCK_M=3", "a power of two from 1 to 1,048,576"),
                                          ("layer_norm_fwd:BLOCK_N=0", "a power of two"),
                                          ("layer_norm_bwd:num_warps=0", "a power of two from 1 to 32"),
                                          ("layer_norm_bwd:num_warps=64", "a power of two from 1 to 32")])
def test_config_values_are_checked(config, rule):
    with pytest.raises(lab.LabError, match=f"--config {config.partition(':')[0]}: .* must be {rule}"):
        ops.check_overrides(lab.get_op("layer_norm"), ops.parse_config([config]))


@pytest.mark.parametrize("value", ["-5", "0", "nan", "inf", "fast"])
def test_bandwidth_must_be_positive(value, capsys):
    with pytest.raises(SystemExit) as refused:
        lab.cli.main(["inspect", "layer_norm", "--bandwidth", value])
    assert refused.value.code == 2
    assert f"argument --bandwidth: must be a positive number of bytes/s, e.g. 3.35e12, got '{value}'" in \
        capsys.readouterr().err


def test_a_failed_compilation_is_one_line():
    """Triton wraps the cause in the kernel's source, over dozens of lines: the lab reports the cause."""
    try:
        try:
            raise ValueError("arange must fit in int32")
        except ValueError as cause:
            raise RuntimeError("at 4:11:\ndef _load_chunk(...):\n    cols = tl.arange(0, CHUNK)\n") from cause
    except RuntimeError as error:
        assert lab.compiler._root_cause(error) == "ValueError: arange must fit in int32"
