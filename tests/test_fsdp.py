"""Sharded training (--parallel fsdp) on CPUs with gloo: equal to one process, resumable across world sizes and
parallelisms, its checkpoint safe from kills, exportable to one file.

One chain of runs covers the resume matrix: FSDP on 2 processes (torchrun, resharding after forward,
selective activation checkpointing), on 1 (in this process), on 3 (torchrun, full activation checkpointing),
then one process without FSDP (DDP's path) and FSDP on 1 again, 2 steps each, compared step by step with one
uninterrupted process (activation checkpointing recomputes bit-identically: test_activation_checkpointing.py).
Every step is 6 micro-batches, which 1, 2 and 3 processes share evenly. DDP on 2 processes equals one process
(test_train.py), so FSDP equals DDP.
"""

import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from test_train import free_port, log_records, tiny
from torch.distributed.checkpoint.metadata import MetadataIndex
from torch.distributed.tensor import DTensor

from gptfast import kernels
from gptfast.checkpoint import load_for_inference
from gptfast.cli import main
from gptfast.distributed import distributed
from gptfast.fsdp import init_gpt2_weights, sharded_model
from gptfast.generation import generate
from gptfast.model import GPT, GPTConfig
from gptfast.pretrained import from_pretrained
from gptfast.sharded_checkpoint import STATE_FILE, load_sharded, read_sharded_state
from gptfast.train import train

pytestmark = pytest.mark.usefixtures("one_thread")

MICRO_BATCHES = 6  # per step, over all processes
LEG = 2  # steps per run of the chain
SHARED = dict(batch_size=1, max_steps=5 * LEG, warmup_steps=2, eval_interval=LEG, eval_batches=3)


# ``gptfast train`` with the fused LM head + loss wrapped: each process appends the type and shape of the
# weight it receives to the file $HEAD_RECORDS.rank-N.
RECORD_THE_HEAD = """
import os, sys
from gptfast import kernels
from gptfast.cli import main
real, rank = kernels.linear_cross_entropy, os.environ["RANK"]
def recorded(x, w, *args, **kwargs):
    with open(os.environ["HEAD_RECORDS"] + ".rank-" + rank, "a") as records:
        print(type(w).__name__, *w.shape, file=records)
    return real(x, w, *args, **kwargs)
kernels.linear_cross_entropy = recorded
sys.exit(main(sys.argv[1:]))
"""


def torchrun(data_dir, out_dir, processes: int, *options: str, script: Path | None = None) -> None:
    """``gptfast train`` under torchrun on ``processes`` CPU processes, for LEG steps (a new run when
    options hold --grad-accum, else resuming); run by ``script`` (given gptfast's arguments) if given."""
    args = ["--preset", "tiny", "--context-length", "32", "--batch-size", "1", "--max-steps", str(5 * LEG),
            "--warmup-steps", "2", "--lr", "3e-3", "--eval-interval", str(LEG), "--eval-batches", "3",
            "--log-interval", "1", "--sample-tokens", "0", "--no-progress", "--backend", "torch", "--device", "cpu",
            "--run-steps", str(LEG), *options]
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(processes),
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
               *([str(script)] if script else ["-m", "gptfast"]), "train", str(data_dir), "--out-dir", str(out_dir),
               *args]
    result = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.fixture(scope="module")
def chain(data_dir, tmp_path_factory):
    """The resume matrix's runs into one out_dir, and one uninterrupted process's run."""
    root = tmp_path_factory.mktemp("chain")
    straight = root / "straight"
    train(tiny(data_dir, straight, grad_accum=MICRO_BATCHES, **SHARED))
    out, script, records = root / "chain", root / "record_the_head.py", root / "head"
    script.write_text(RECORD_THE_HEAD)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HEAD_RECORDS", str(records))
        torchrun(data_dir, out, 2, "--parallel", "fsdp", "--grad-accum", str(MICRO_BATCHES // 2),
                 "--reshard-after-forward", "--activation-checkpointing", "selective", script=script)
    weights, real = [], kernels.linear_cross_entropy  # what the fused LM head + loss receives
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(kernels, "linear_cross_entropy", lambda x, w, *a, **k: weights.append(w) or real(x, w, *a, **k))
        train(tiny(data_dir, out, parallel="fsdp", resume=True, run_steps=LEG, **SHARED))  # 2 -> 1
    torchrun(data_dir, out, 3, "--parallel", "fsdp", "--resume", "--activation-checkpointing", "full")  # 1 -> 3
    shard_bytes = bytes_per_shard_file(out / "ckpt")
    train(tiny(data_dir, out, resume=True, run_steps=LEG, **SHARED))  # FSDP -> DDP's path
    assert (out / "ckpt.pt").is_file() and not (out / "ckpt").exists() and not list(out.glob("ckpt.step-*"))
    train(tiny(data_dir, out, parallel="fsdp", resume=True, **SHARED))  # DDP -> FSDP
    at_two = {rank: (records.parent / f"{records.name}.rank-{rank}").read_text().splitlines() for rank in (0, 1)}
    return {"straight": straight, "out": out, "weights": weights, "at_two": at_two, "shard_bytes": shard_bytes}


def test_fsdp_across_world_sizes_and_ddp_equals_one_process(chain):
    chained, straight = log_records(chain["out"]), log_records(chain["straight"])
    assert [r["step"] for r in chained] == [r["step"] for r in straight] and chained[-1]["step"] == 5 * LEG
    for a, b in zip(chained, straight):
        key = "loss" if "loss" in b else "val_loss"
        # Float32 sums in another order (2 or 3 processes' reduce-scatter, the micro-batches' split): not bitwise
        # (measured: 1e-6, the log's last digit).
        assert a[key] == pytest.approx(b[key], abs=2e-5), (a, b)
    assert chained[0]["loss"] == pytest.approx(straight[0]["loss"], abs=2e-6)  # the same initial weights
    sharded, whole = GPT(load_for_inference(chain["straight"])[0].config), load_for_inference(chain["straight"])[0]
    load_sharded(chain["out"], sharded, None)
    for name, tensor in whole.state_dict().items():  # measured: 3.4e-6 at most
        torch.testing.assert_close(sharded.state_dict()[name], tensor, rtol=1e-4, atol=2e-5)


def test_the_tied_head_reaches_the_kernel_as_a_plain_whole_tensor(chain):
    config = load_for_inference(chain["straight"])[0].config
    whole = (config.padded_vocab_size, config.n_embd)
    assert chain["weights"] and all(type(w) is torch.nn.Parameter and not isinstance(w, DTensor) and
                                    tuple(w.shape) == whole for w in chain["weights"])
    # At 2 processes, each holding half its rows: every call (micro-batches, validation batches) got it whole.
    for rank, calls in chain["at_two"].items():
        assert len(calls) >= LEG * MICRO_BATCHES // 2 and set(calls) == {f"Parameter {whole[0]} {whole[1]}"}, rank


def bytes_per_shard_file(folder: Path) -> dict[str, int]:
    """The bytes of the tensors each process saved (its file), from the chunks DCP's index lists."""
    metadata = dcp.FileSystemReader(folder).read_metadata()
    saved = dict.fromkeys(sorted({info.relative_path for info in metadata.storage_data.values()}), 0)
    for name, tensor in metadata.state_dict_metadata.items():
        for chunk in getattr(tensor, "chunks", ()):
            file = metadata.storage_data[MetadataIndex(name, chunk.offsets)].relative_path
            saved[file] += math.prod(chunk.sizes) * tensor.properties.dtype.itemsize
    return saved


def test_each_process_holds_a_third_of_the_state_on_three(chain):
    """Each process held, and saved, its shards of the weights and of AdamW's two moments."""
    saved = chain["shard_bytes"]
    model = load_for_inference(chain["straight"])[0]
    whole = 3 * 4 * model.num_parameters()  # float32 weights, exp_avg, exp_avg_sq
    assert list(saved) == ["__0_0.distcp", "__1_0.distcp", "__2_0.distcp"]
    # The state dict names the tied wte/LM-head matrix twice (DCP writes it under each name), AdamW counts steps.
    assert whole <= sum(saved.values()) <= whole * 1.01
    assert max(saved.values()) <= min(saved.values()) * 1.05, saved  # 3 does not divide every matrix's rows


def test_export_then_generate_equals_the_sharded_model(chain, tmp_path, capsys):
    out = chain["out"]
    sharded = GPT(load_for_inference(chain["straight"])[0].config)
    load_sharded(out, sharded, None)
    assert main(["export", str(out), "--out", str(tmp_path / "one.pt")]) == 0
    assert main(["export", str(out / "ckpt"), "--out", str(tmp_path / "hf")]) == 0
    exported, _ = load_for_inference(tmp_path / "one.pt")
    prompt = [[1, 2, 3]]
    expected = generate(sharded.eval(), prompt, 12, temperature=0.8, top_k=5, seed=3)
    assert generate(exported, prompt, 12, temperature=0.8, top_k=5, seed=3) == expected
    hf = from_pretrained(tmp_path / "hf")
    assert all(torch.equal(hf.state_dict()[k], v) for k, v in sharded.state_dict().items())
    assert main(["export", str(tmp_path / "one.pt"), "--out", str(tmp_path / "hf-of-one")]) == 0  # a single file
    assert all(torch.equal(from_pretrained(tmp_path / "hf-of-one").state_dict()[k], v)
               for k, v in sharded.state_dict().items())
    assert main(["export", str(out), "--out", str(tmp_path / "one.pt")]) == 2  # never overwritten
    assert "exists" in capsys.readouterr().err


def test_meta_initialisation_equals_a_whole_model_s():
    config = GPTConfig(vocab_size=50, context_length=8, n_embd=16, n_head=2, n_layer=2)
    whole = init_gpt2_weights(GPT(config), seed=5)
    with distributed("cpu", group_of_one=True) as (world, device):
        model = init_gpt2_weights(sharded_model(config, world, device, None), seed=5)
        weights = {name: p.full_tensor() for name, p in model.named_parameters()}
    assert weights.keys() == dict(whole.named_parameters()).keys()
    assert all(torch.equal(weights[name], p) for name, p in whole.named_parameters())
    assert whole.transformer.h[0].attn.c_proj.weight.std() < 0.02 / 1.5  # the scaled residual projections


def test_the_bf16_policy_computes_in_bf16_on_float32_master_weights(monkeypatch):
    config = GPTConfig(vocab_size=50, context_length=8, n_embd=16, n_head=2, n_layer=1)
    seen, real = [], kernels.linear_cross_entropy
    monkeypatch.setattr(kernels, "linear_cross_entropy",
                        lambda x, w, *a, **k: seen.append((x.dtype, w.dtype)) or real(x, w, *a, **k))
    with kernels.use_backend("torch"), distributed("cpu", group_of_one=True) as (world, device):
        model = init_gpt2_weights(sharded_model(config, world, device, torch.bfloat16), seed=1)
        idx = torch.randint(0, 50, (2, 8))
        _, loss = model(idx, idx)
        loss.backward()
        assert seen == [(torch.bfloat16, torch.bfloat16)] and loss.isfinite()
        assert all(p.dtype == p.grad.dtype == torch.float32 for p in model.parameters())


def one_error_line(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_bad_input_is_one_line(chain, data_dir, tmp_path, capsys):
    out = chain["out"]
    assert "is a sharded checkpoint" in one_error_line(capsys, ["generate", "--checkpoint", str(out),
                                                                "--max-new-tokens", "2"])
    init_from = ["train", str(data_dir), "--out-dir", str(tmp_path / "i"), "--init-from", str(out), "--device", "cpu"]
    assert "is a sharded checkpoint" in one_error_line(capsys, init_from)
    assert "single-file checkpoint" in one_error_line(capsys, ["export", str(chain["straight"] / "ckpt.pt"),
                                                               "--out", str(tmp_path / "x.pt")])
    damaged = tmp_path / "damaged"
    shutil.copytree((out / "ckpt").resolve(), damaged)
    (damaged / "__0_0.distcp").unlink()
    assert "shard file __0_0.distcp is missing" in one_error_line(capsys, ["export", str(damaged), "--out",
                                                                           str(tmp_path / "x.pt")])
    shutil.rmtree(damaged)
    shutil.copytree((out / "ckpt").resolve(), damaged)
    state = torch.load(damaged / STATE_FILE, weights_only=True)
    state["model_config"].update(n_embd=64, n_head=2)  # another model size
    torch.save(state, damaged / STATE_FILE)
    assert "does not fit this model" in one_error_line(capsys, ["export", str(damaged), "--out",
                                                                str(tmp_path / "x.pt")])
    train_args = ["train", str(data_dir), "--out-dir", str(tmp_path / "new"), "--device", "cpu", "--max-steps", "1"]
    assert "--dtype bf16 or --dtype fp32" in one_error_line(capsys, [*train_args, "--parallel", "fsdp",
                                                                     "--dtype", "fp16"])
    assert "applies to --parallel fsdp only" in one_error_line(capsys, [*train_args, "--reshard-after-forward"])


KILL_AT_DCP_FINISH = """
import os, signal, sys
import torch.distributed.checkpoint.filesystem as fs
from test_train import tiny
from gptfast.train import train
fs.FileSystemWriter.finish = lambda *args, **kwargs: os.kill(os.getpid(), signal.SIGKILL)  # shards written, no index
train(tiny(sys.argv[1], sys.argv[2], resume=True, parallel="fsdp", max_steps=4, eval_interval=2, batch_size=2))
"""
KILL_OPTIONS = dict(parallel="fsdp", max_steps=4, eval_interval=2, batch_size=2, dropout=0.1)  # re-seeded on resume


class Died(BaseException):
    """A death at a chosen moment of a save: nothing of the save's own runs after it, as after kill -9."""


@pytest.fixture(scope="module")
def two_of_four_steps(data_dir, tmp_path_factory):
    """A run of 4 steps, and another stopped after 2 with its sharded checkpoint."""
    root = tmp_path_factory.mktemp("kill")
    straight = train(tiny(data_dir, root / "straight", **KILL_OPTIONS))
    train(tiny(data_dir, root / "half", run_steps=2, **KILL_OPTIONS))
    return straight, root / "half"


@pytest.mark.parametrize("moment", ["sigkill as DCP finishes", "after the folder's rename", "after the link's"])
def test_a_kill_during_a_sharded_save_leaves_a_loadable_checkpoint(data_dir, tmp_path, two_of_four_steps, moment,
                                                                   monkeypatch):
    straight, half = two_of_four_steps
    out = tmp_path / "out"
    shutil.copytree(half, out, symlinks=True)
    if moment.startswith("sigkill"):
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), *sys.path])}
        result = subprocess.run([sys.executable, "-c", KILL_AT_DCP_FINISH, str(data_dir), str(out)], env=env,
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
    else:
        real_replace = os.replace
        last = "ckpt.step-4" if "folder" in moment else "ckpt"

        def replace_then_die(src, dst):
            real_replace(src, dst)
            if Path(dst) == out / last:
                raise Died

        monkeypatch.setattr(os, "replace", replace_then_die)
        with pytest.raises(Died):
            train(tiny(data_dir, out, resume=True, **KILL_OPTIONS))
        monkeypatch.undo()
    kept = read_sharded_state(out)["step"]
    assert kept == (4 if "link" in moment else 2)
    if kept == 2:  # resumed, it ends as the run that was never killed, its leftovers deleted
        resumed = train(tiny(data_dir, out, resume=True, **KILL_OPTIONS))
        assert resumed["loss"] == straight["loss"] and resumed["val_loss"] == straight["val_loss"]
    leftover = ["ckpt.step-2"] if kept == 4 else []  # deleted by the next save
    assert sorted(p.name for p in out.glob("ckpt*")) == sorted(["ckpt", "ckpt.step-4", *leftover])
