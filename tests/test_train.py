"""Training end to end on tiny models: learning, exact resume, DDP equality, interrupts, the CLI.

The runs are on the CPU even where a GPU exists: CPU kernels are deterministic, so resumed and
distributed runs can be compared exactly (and two processes cannot share one GPU under NCCL). A
separate test trains on CUDA with bfloat16 autocast when a GPU is present.
"""

import dataclasses
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from gptfast import GPTConfig
from gptfast.checkpoint import FORMAT, load_checkpoint, load_for_inference, save_checkpoint
from gptfast.cli import main
from gptfast.data import TokenData, prepare
from gptfast.distributed import init_distributed
from gptfast.evaluate import split_loss
from gptfast.model import GPT
from gptfast.precision import amp_dtype_for
from gptfast.runlog import LOG_FILE
from gptfast.tokenizer import TIKTOKEN_FILE_ENV
from gptfast.train import TrainConfig, lr_at, make_optimizer, model_flops_per_token, train, train_step

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(data_dir, out_dir, **overrides) -> TrainConfig:
    """A ~0.8M-parameter model on 32-token windows: a step takes milliseconds on a CPU."""
    base = dict(data=[str(data_dir)], out_dir=str(out_dir), preset="tiny", context_length=32,
                batch_size=8, max_steps=20, warmup_steps=5, lr=3e-3, eval_interval=10, eval_batches=2,
                log_interval=1, sample_tokens=0, progress=False, backend="torch", device="cpu")
    return TrainConfig(**{**base, **overrides})


def log_records(out_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(out_dir) / LOG_FILE).read_text().splitlines()]


def test_loss_falls_over_50_steps(data_dir, tmp_path):
    summary = train(tiny(data_dir, tmp_path, max_steps=50, eval_interval=25, sample_tokens=20))
    losses = [r["loss"] for r in log_records(tmp_path) if "loss" in r]
    assert len(losses) == 50
    assert losses[0] > math.log(100) - 0.05  # ~uniform over the ~100 characters at first
    assert summary["loss"] < losses[0] - 1.0 and summary["val_loss"] < losses[0] - 1.0
    assert (tmp_path / "loss.png").stat().st_size > 1000 and (tmp_path / "ckpt.pt").is_file()
    assert isinstance(summary["sample"], str) and len(summary["sample"]) == 20  # 20 characters
    assert not summary["stopped"]


@pytest.mark.parametrize("order, dropout", [("random", 0.1), ("sequential", 0.0)])
def test_resume_is_exact(data_dir, tmp_path, order, dropout):
    straight = train(tiny(data_dir, tmp_path / "straight", order=order, dropout=dropout))
    first = train(tiny(data_dir, tmp_path / "split", order=order, dropout=dropout, run_steps=10))
    assert first["stopped"] and first["step"] == 10
    with open(tmp_path / "split" / LOG_FILE, "a") as log:  # as if the run had crashed at step 15
        log.write(json.dumps({"step": 15, "loss": 9.9}) + "\n")
    resumed = train(tiny(data_dir, tmp_path / "split", order=order, dropout=dropout, resume=True))
    assert resumed["step"] == straight["step"] == 20
    assert resumed["loss"] == straight["loss"] and resumed["val_loss"] == straight["val_loss"]
    a, b = (load_checkpoint(tmp_path / d)["model"] for d in ("straight", "split"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    # The split run's log holds every step once, as the straight run's does (step 15's line is gone).
    steps = {run: [r["step"] for r in log_records(tmp_path / run)] for run in ("split", "straight")}
    assert steps["split"] == steps["straight"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_processes_equal_one_with_double_accumulation(data_dir, tmp_path):
    args = ["--preset", "tiny", "--context-length", "32", "--batch-size", "4", "--max-steps", "6",
            "--warmup-steps", "2", "--lr", "3e-3", "--eval-interval", "3", "--eval-batches", "2",
            "--log-interval", "1", "--sample-tokens", "0", "--no-progress", "--backend", "torch", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
               "-m", "gptfast", "train", str(data_dir), "--out-dir", str(tmp_path / "ddp"), *args]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    ddp = log_records(tmp_path / "ddp")
    single = train(tiny(data_dir, tmp_path / "one", batch_size=4, grad_accum=2, max_steps=6, warmup_steps=2,
                        eval_interval=3))
    one = log_records(tmp_path / "one")
    assert [r["step"] for r in ddp] == [r["step"] for r in one]
    for r_ddp, r_one in zip(ddp, one):
        key = "loss" if "loss" in r_one else "val_loss"
        assert r_ddp[key] == pytest.approx(r_one[key], abs=2e-5), (r_ddp, r_one)
    assert ddp[-1]["val_loss"] == pytest.approx(single["val_loss"], abs=2e-5)
    a, b = load_checkpoint(tmp_path / "ddp")["model"], load_checkpoint(tmp_path / "one")["model"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


def child_with_rank(parent: int, rank: int) -> int:
    """The pid of the process torchrun (``parent``) started as ``rank``."""
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == parent \
                    and f"RANK={rank}".encode() in (entry / "environ").read_bytes().split(b"\0"):
                return int(entry.name)
        except OSError:
            continue
    raise AssertionError(f"no rank {rank} under pid {parent}")


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds torchrun's workers through /proc")
def test_a_stopped_ddp_peer_ends_the_run_after_the_timeout(data_dir, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "-m", "gptfast", "train",
               str(data_dir), "--out-dir", str(out), "--context-length", "32", "--batch-size", "4", "--max-steps",
               "100000", "--log-interval", "1", "--sample-tokens", "0", "--no-progress", "--backend", "torch",
               "--device", "cpu", "--ddp-timeout", "4"]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stopped = None
    try:
        deadline = time.monotonic() + 120
        while not ((out / LOG_FILE).is_file() and (out / LOG_FILE).read_text().count("\n") >= 3):
            assert process.poll() is None and time.monotonic() < deadline, process.communicate()[1]
            time.sleep(0.2)
        stopped = child_with_rank(process.pid, 1)
        os.kill(stopped, signal.SIGSTOP)  # a peer that no longer answers
        started = time.monotonic()
        rank0 = child_with_rank(process.pid, 0)
        while Path(f"/proc/{rank0}").exists() and time.monotonic() - started < 60:
            if (Path(f"/proc/{rank0}/stat").read_text().rsplit(")", 1)[1].split()[0]) == "Z":
                break
            time.sleep(0.2)
        waited = time.monotonic() - started
        os.kill(stopped, signal.SIGKILL)
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert waited < 30, stderr[-3000:]  # the 4 s timeout, not torch's 30 minutes
    assert "gptfast train: error: rank 0: lost contact with the other training processes" in stderr, stderr[-3000:]
    assert "within the 4 s collective timeout" in stderr


def test_interrupted_run_checkpoint_loads_and_resumes(data_dir, tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "gptfast", "train", str(data_dir), "--out-dir", str(out), "--preset",
               "tiny", "--context-length", "32", "--batch-size", "8", "--max-steps", "100000",
               "--log-interval", "1", "--eval-interval", "100000", "--no-progress", "--backend", "torch",
               "--device", "cpu"]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not ((out / LOG_FILE).is_file() and (out / LOG_FILE).read_text().count("\n") >= 3):
            assert process.poll() is None and time.monotonic() < deadline, process.communicate()[1]
            time.sleep(0.2)
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, stderr[-3000:]  # stopped by SIGINT, after saving: 128 + 2
    assert "continue with --resume" in stdout
    assert "Ctrl-C: stopping after this step (Ctrl-C again to abort)" in stderr and "Traceback" not in stderr
    state = load_checkpoint(out)
    assert state["step"] >= 3 and state["train_config"]["max_steps"] == 100000
    model, tokenizer = load_for_inference(out)
    assert not model.training and tokenizer.vocab_size == model.config.vocab_size
    logits, _ = model(torch.tensor([tokenizer.encode("def f():")]))
    assert torch.isfinite(logits).all()
    resumed = train(tiny(data_dir, out, max_steps=100000, eval_interval=100000, run_steps=2, resume=True))
    assert resumed["step"] == state["step"] + 2


def test_plain_cuda_device_gets_the_current_index(monkeypatch):
    """--device cuda means the current GPU: torch.cuda.set_device and DDP need its index."""
    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: chosen.append(device))
    _, device = init_distributed("cuda")
    assert device == torch.device("cuda", 3) and chosen == [device]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_cuda_bfloat16_training(data_dir, tmp_path, backend):
    summary = train(tiny(data_dir, tmp_path, device="cuda", backend=backend, max_steps=40, eval_interval=20,
                         grad_accum=2, dropout=0.1, sample_tokens=10))
    records = log_records(tmp_path)
    losses = [r["loss"] for r in records if "loss" in r]
    assert summary["loss"] < losses[0] - 0.5 and math.isfinite(summary["val_loss"])
    assert all(r["tokens_per_sec"] > 0 for r in records if "loss" in r)
    model, _ = load_for_inference(tmp_path, device="cuda")
    assert next(model.parameters()).dtype == torch.float32  # autocast leaves the weights in float32
    resumed = train(tiny(data_dir, tmp_path, device="cuda", backend=backend, max_steps=45, eval_interval=20,
                         grad_accum=2, dropout=0.1, resume=True))
    assert resumed["step"] == 45 and abs(resumed["loss"] - summary["loss"]) < 0.5


def test_refuses_to_overwrite_or_resume_nothing(data_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="cannot resume"):
        train(tiny(data_dir, tmp_path, resume=True))
    train(tiny(data_dir, tmp_path, max_steps=2))
    with pytest.raises(FileExistsError, match="pass resume=True .* or overwrite=True .* another out_dir"):
        train(tiny(data_dir, tmp_path, max_steps=2))  # a Python caller is told Python's names
    assert train(tiny(data_dir, tmp_path, max_steps=2, overwrite=True))["step"] == 2
    with pytest.raises(ValueError, match="already at max_steps 2: raise max_steps"):
        train(tiny(data_dir, tmp_path, max_steps=2, resume=True))


def test_text_is_prepared_once_per_run(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("abc def\n" * 300)
    assert train(tiny(None, tmp_path / "out", data=[str(text)], max_steps=4, run_steps=2))["stopped"]
    text.write_text("xyz\n" * 300)  # resuming reads the data the run started with
    assert train(tiny(None, tmp_path / "out", data=[str(text)], max_steps=4, resume=True))["step"] == 4
    assert TokenData(tmp_path / "out" / "data").tokenizer().chars == "\n abcdef"


@pytest.mark.skipif(not os.environ.get(TIKTOKEN_FILE_ENV), reason=f"no local GPT-2 ranks file (${TIKTOKEN_FILE_ENV})")
def test_gpt2_tokenizer_run(tmp_path):
    summary = train(tiny(None, tmp_path, data=None, tokenizer="gpt2", max_steps=3, eval_interval=3,
                         sample_prompt="The", sample_tokens=4))
    model, tokenizer = load_for_inference(tmp_path)
    assert model.config.vocab_size == tokenizer.vocab_size == 50257
    assert isinstance(summary["sample"], str) and math.isfinite(summary["val_loss"])


def test_context_longer_than_the_text(tmp_path):
    (tmp_path / "short.txt").write_text("a short text\n" * 4)
    with pytest.raises(ValueError, match="split holds .* tokens, fewer than one context window"):
        train(tiny(None, tmp_path / "out", data=[str(tmp_path / "short.txt")]))


def test_prompt_outside_vocabulary_fails_before_training(data_dir, tmp_path):
    with pytest.raises(ValueError, match=r"U\+0000.*not in this character-level vocabulary"):
        train(tiny(data_dir, tmp_path, sample_prompt="\x00", sample_tokens=5))
    assert not (tmp_path / "ckpt.pt").exists()


def test_tokens_per_step_sets_accumulation(data_dir, tmp_path):
    summary = train(tiny(data_dir, tmp_path, tokens_per_step=3 * 8 * 32, max_steps=1))
    assert summary["step"] == 1
    with pytest.raises(ValueError, match="not a multiple"):
        train(tiny(data_dir, tmp_path / "b", tokens_per_step=1000, max_steps=1))


def test_config_errors():
    with pytest.raises(ValueError, match="unknown preset"):
        TrainConfig(preset="huge")
    with pytest.raises(ValueError, match="unknown backend"):
        TrainConfig(backend="cuda")
    with pytest.raises(ValueError, match="batch_size must be positive"):
        TrainConfig(batch_size=0)


def test_python_values_are_checked_by_their_declarations():
    """TrainConfig(...) checks each value as the command line does, from the same declarations: a
    wrong type or range is one ValueError naming the field; a path, numpy integer or whole float is
    normalised (issue 30)."""
    import numpy as np

    for fields, words in ((dict(batch_size="8"), "batch_size must be an integer, got '8'"),
                          (dict(data=5), "data must be a list of strings, got 5"),
                          (dict(seed=2**70), "seed must be an integer from -2**63 to 2**63 - 1"),
                          (dict(lr=math.nan), "lr must be a finite number, got nan"),
                          (dict(beta1=1.0), "beta1 must be in [0, 1), got 1.0"),
                          (dict(max_steps=2.5), "max_steps must be an integer, got 2.5"),
                          (dict(progress="no"), "progress must be true or false, got 'no'")):
        with pytest.raises(ValueError) as error:
            TrainConfig(**fields)
        assert str(error.value) == words or str(error.value).startswith(words), error.value
    cfg = TrainConfig(out_dir=Path("runs/a"), data=[Path("d")], batch_size=np.int64(4), max_steps=1e4)
    assert (cfg.out_dir, cfg.data, cfg.batch_size, cfg.max_steps) == ("runs/a", ["d"], 4, 10_000)
    assert type(cfg.batch_size) is int and type(cfg.max_steps) is int


def test_lr_schedule():
    cfg = TrainConfig(lr=1.0, min_lr=0.1, warmup_steps=10, max_steps=110)
    assert lr_at(0, cfg) == pytest.approx(0.1) and lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(10, cfg) == pytest.approx(1.0) and lr_at(60, cfg) == pytest.approx(0.55)
    assert lr_at(110, cfg) == pytest.approx(0.1)
    lrs = [lr_at(s, cfg) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_a_config_holds_its_defaults_and_records_what_was_given():
    """Left out, an option is its declared default; which were given survives a later resume=True,
    dataclasses.replace and an option set afterwards (a resumed run takes the others from the checkpoint)."""
    cfg = TrainConfig()
    assert (cfg.lr, cfg.max_steps, cfg.dtype, cfg.preset, cfg.tokenizer, cfg.include) == (1e-3, 500, "auto", "tiny",
                                                                                           "char", [])
    assert lr_at(0, cfg) == pytest.approx(1e-3 / 50) and lr_at(0, TrainConfig(lr=1.0)) == pytest.approx(1 / 50)
    assert TrainConfig(lr=1e-3, dropout=0.0, device="cpu").given == {"lr", "dropout"} and cfg.given == set()
    later = TrainConfig(max_steps=7)
    later.resume, later.warmup_steps = True, 9
    assert later.given == {"max_steps"} and later.is_given("warmup_steps") and not later.is_given("lr")
    copy = dataclasses.replace(TrainConfig(lr=1e-3), resume=True, grad_clip=0.5)
    assert copy.given == {"lr", "grad_clip"} and copy.max_steps == 500 and not copy.is_given("max_steps")
    assert dataclasses.replace(copy, lr=None).lr == 1e-3 and not dataclasses.replace(copy, lr=None).is_given("lr")
    assert (TrainConfig(init_from="gpt2").preset, TrainConfig(init_from="gpt2").tokenizer) == (None, None)


def test_optimizer_decays_matrices_only():
    from gptfast import GPT

    model = GPT(GPTConfig(vocab_size=50, n_layer=1, n_head=2, n_embd=16, context_length=8))
    decay, no_decay = make_optimizer(model, lr=1e-3, weight_decay=0.1).param_groups
    assert decay["weight_decay"] == 0.1 and all(p.dim() == 2 for p in decay["params"])
    assert no_decay["weight_decay"] == 0.0 and all(p.dim() == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_train_step_accumulation_matches_one_big_batch():
    from gptfast import GPT

    torch.manual_seed(0)
    config = GPTConfig(vocab_size=50, n_layer=1, n_head=2, n_embd=16, context_length=8)
    a, b = GPT(config).double(), GPT(config).double()
    b.load_state_dict(a.state_dict())
    x, y = torch.randint(0, 50, (2, 4, 8))
    loss_a, norm_a = train_step(a, make_optimizer(a, 1e-2), [(x, y)], lr=1e-2)
    loss_b, norm_b = train_step(b, make_optimizer(b, 1e-2), [(x[:2], y[:2]), (x[2:], y[2:])], lr=1e-2)
    torch.testing.assert_close(loss_a, loss_b)
    torch.testing.assert_close(norm_a, norm_b)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q)


def test_amp_dtype_for_each_device(monkeypatch):
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert amp_dtype_for("auto", cpu) is None and amp_dtype_for("float16", cpu) == torch.float16
    assert amp_dtype_for("bfloat16", gpu) == torch.bfloat16 and amp_dtype_for("float32", gpu) is None
    for capability, dtype in (((9, 0), torch.bfloat16), ((8, 0), torch.bfloat16), ((7, 5), torch.float16)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device, c=capability: c)
        assert amp_dtype_for("auto", gpu) == dtype  # H100, A100; T4 has no bf16 arithmetic
    with pytest.raises(ValueError, match="dtype must be one of auto, bfloat16, float16, float32"):
        TrainConfig(dtype="half")


def test_train_step_skips_a_step_whose_float16_gradients_overflow():
    """With loss scaling, gradients that overflow float16 leave the weights unchanged and halve the
    scale; the next step, at a workable scale, updates them."""
    from gptfast import GPT

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50, n_layer=1, n_head=2, n_embd=16, context_length=8))
    optimizer = make_optimizer(model, 1e-2)
    x, y = torch.randint(0, 50, (2, 4, 8))
    before = [p.detach().clone() for p in model.parameters()]
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40)  # float16 overflows past 65504
    loss, _ = train_step(model, optimizer, [(x, y)], lr=1e-2, amp_dtype=torch.float16, scaler=scaler)
    assert torch.isfinite(loss) and scaler.get_scale() == 2.0**39
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    scaler.update(2.0**8)
    train_step(model, optimizer, [(x, y)], lr=1e-2, amp_dtype=torch.float16, scaler=scaler)
    assert scaler.get_scale() == 2.0**8 and not torch.equal(model.lm_head.weight, before[0])


def test_float16_training_with_loss_scaling(data_dir, tmp_path):
    """float16 autocast (what --dtype auto picks on GPUs without bf16), here on the CPU: the loss
    falls, and the loss scale is checkpointed and restored."""
    summary = train(tiny(data_dir, tmp_path, dtype="float16", max_steps=30, eval_interval=15))
    losses = [r["loss"] for r in log_records(tmp_path) if "loss" in r]
    assert summary["loss"] < losses[0] - 0.5 and math.isfinite(summary["val_loss"])
    state = load_checkpoint(tmp_path)
    assert state["scaler"]["scale"] > 0
    resumed = train(tiny(data_dir, tmp_path, dtype="float16", max_steps=32, eval_interval=15, resume=True))
    assert resumed["step"] == 32 and math.isfinite(resumed["loss"])


def test_model_flops_per_token():
    config = GPTConfig.from_preset("gpt2")
    weights = 124_439_808 - 1024 * 768  # without the position embeddings
    assert model_flops_per_token(config) == 6 * weights + 12 * 12 * 1024 * 768
    assert model_flops_per_token(config, seq_len=512) == 6 * weights + 12 * 12 * 512 * 768


class Payload:
    """An arbitrary class: unpickling it would run its module's code."""


def test_checkpoint_refuses_pickled_code(tmp_path):
    torch.save({"format": FORMAT, "payload": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match=r"holds pickled Python objects \(test_train.Payload\).*refused") as error:
        load_checkpoint(tmp_path / "evil.pt")
    assert "weights_only" not in str(error.value)  # torch's advice to load it anyway is wrong here
    torch.save({"model": {}}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a gptfast checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        load_checkpoint(tmp_path / "none.pt")
    save_checkpoint(tmp_path / "ok.pt", {"step": 3})
    assert load_checkpoint(tmp_path / "ok.pt")["step"] == 3 and not (tmp_path / "ok.pt.tmp").exists()


def test_cli_prepare_and_train(tmp_path, capsys):
    (tmp_path / "text.txt").write_text("the quick brown fox jumps over the lazy dog\n" * 200)
    assert main(["prepare", str(tmp_path / "text.txt"), "--out", str(tmp_path / "data")]) == 0
    assert "tokens" in capsys.readouterr().out
    assert main(["train", str(tmp_path / "data"), "--out-dir", str(tmp_path / "out"), "--context-length", "16",
                 "--batch-size", "4", "--max-steps", "3", "--eval-interval", "3", "--eval-batches", "1",
                 "--sample-tokens", "5", "--no-progress", "--backend", "torch", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "step 3: train loss" in out and "sample (5 tokens" in out


def test_eval_matches_the_validation_loss_of_training(data_dir, tmp_path, capsys):
    """`gptfast eval` over the windows training validates on gives training's validation loss; over
    the whole split, split_loss's mean weights every window alike."""
    summary = train(tiny(data_dir, tmp_path, max_steps=10, eval_interval=10))
    argv = ["eval", "--checkpoint", str(tmp_path), str(data_dir), "--device", "cpu"]
    assert main(argv + ["--max-windows", "16", "--batch-size", "5"]) == 0  # training: 2 batches of 8
    out = capsys.readouterr().out
    assert f"val split of {data_dir}: 512 tokens in windows of 32: loss {summary['val_loss']:.4f}" in out
    model, _ = load_for_inference(tmp_path)
    val = TokenData(data_dir).val
    loss, n = split_loss(model, val, 32, batch_size=7)
    assert n == (len(val) - 1) // 32 * 32
    windows = torch.from_numpy(val[: n + 1].astype("int64"))
    with torch.no_grad():
        _, want = model(windows[:n].view(-1, 32), windows[1:].view(-1, 32))
    assert abs(loss - want.item()) < 1e-5


def test_eval_refuses_data_of_another_tokenization(data_dir, tmp_path, capsys):
    train(tiny(data_dir, tmp_path / "run", max_steps=1, eval_interval=1))
    (tmp_path / "text.txt").write_text("abc\n" * 100)
    prepare([str(tmp_path / "text.txt")], tmp_path / "abc")
    argv = ["eval", "--checkpoint", str(tmp_path / "run"), "--device", "cpu"]
    assert main(argv + [str(tmp_path / "abc")]) == 2
    assert "numbers its characters differently from the model's vocabulary" in capsys.readouterr().err
    assert main(argv + [str(data_dir), "--context-length", "33"]) == 2
    assert "--context-length 33 must be between 1 and the model's 32" in capsys.readouterr().err


def test_cli_backend_reaches_the_train_config(monkeypatch):
    """--backend, after `train` or before it, is the TrainConfig's own, not a global the trainer reads
    back; without it, the run gets the backend in force ($GPTFAST_BACKEND, or auto)."""
    from gptfast import cli, kernels

    configs = []
    monkeypatch.setattr(cli, "train", lambda cfg: configs.append(cfg) or {"signal": None})
    monkeypatch.setattr(kernels, "set_backend", lambda name: None)  # main() selects it for other commands
    with kernels.use_backend("triton"):
        for argv in (["train"], ["train", "--backend", "torch"], ["--backend", "torch", "train"]):
            assert main(argv) == 0
    assert [cfg.backend for cfg in configs] == ["triton", "torch", "torch"]


def test_throughput_leaves_paused_time_out(monkeypatch):
    """Tokens per second and MFU over the steps since the last measurement, validation time excluded."""
    from gptfast import runlog

    now = [0.0]
    monkeypatch.setattr(runlog.time, "perf_counter", lambda: now[0])
    meter = runlog.Throughput(step=10, tokens_per_step=100, flops_per_step=1e3, peak_flops=1e4)
    now[0] = 2.0
    with meter.paused():
        now[0] = 7.0  # five seconds of validation and checkpointing
    now[0] = 8.0
    assert meter.measure(14) == pytest.approx((4 * 100 / 3.0, 4 * 1e3 / 3.0 / 1e4))
    now[0] = 10.0
    assert meter.measure(15) == pytest.approx((50.0, 0.05))
    no_peak = runlog.Throughput(0, 100, 1e3, None)
    now[0] = 11.0
    assert no_peak.measure(1) == (100.0, None)


def test_cli_bad_input_is_one_clear_line(tmp_path, capsys):
    assert main(["prepare", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "data")]) == 2
    assert capsys.readouterr().err == f"gptfast prepare: error: no such file or folder: '{tmp_path / 'missing.txt'}'\n"


@pytest.mark.parametrize("command", ["prepare", "train", "eval", "info"])
def test_cli_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: gptfast " + command in capsys.readouterr().out


def test_console_lines_without_a_progress_bar(data_dir, tmp_path, capsys):
    """--no-progress (and no terminal) prints a line every log_interval steps and no carriage returns;
    before the first measured loss, the validation line gives the validation loss alone."""
    train(tiny(data_dir, tmp_path / "a", max_steps=4, log_interval=2, eval_interval=1))
    out, err = capsys.readouterr()
    assert [line.split(":")[0] for line in out.splitlines() if "/4:" in line] == ["step 2/4", "step 4/4"]
    assert "step 1: val loss" in out and "nan" not in out
    train(tiny(data_dir, tmp_path / "b", max_steps=2, progress=True))  # progress asked, but not a terminal
    out, err = capsys.readouterr()
    assert "step 2/2: loss" in out and "\r" not in out + err


def test_without_matplotlib_training_says_once_how_to_get_the_plot(data_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    train(tiny(data_dir, tmp_path, max_steps=1))
    out = capsys.readouterr().out
    assert out.count("no loss plot: matplotlib is not installed (pip install matplotlib)") == 1
    assert not (tmp_path / "loss.png").exists()


def test_tensorboard_gets_the_scalars_of_the_log(data_dir, tmp_path, monkeypatch, capsys):
    import types

    events = []

    class SummaryWriter:
        def __init__(self, log_dir, purge_step=None):
            events.append(("open", log_dir, purge_step))

        def add_scalar(self, tag, value, step):
            events.append((tag, value, step))

        def close(self):
            events.append(("close",))

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=SummaryWriter))
    train(tiny(data_dir, tmp_path, max_steps=3, eval_interval=3, tensorboard=True))
    assert events[0] == ("open", str(tmp_path / "tensorboard"), None) and events[-1] == ("close",)
    logged = [(k, v, r["step"]) for r in log_records(tmp_path) for k, v in r.items() if k != "step" and v is not None]
    assert events[1:-1] == logged and {"loss", "lr", "tokens_per_sec", "val_loss"} <= {e[0] for e in logged}
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    argv = ["train", str(data_dir), "--out-dir", str(tmp_path / "b"), "--tensorboard", "--device", "cpu"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err == "gptfast train: error: TensorBoard logging (tensorboard=True, --tensorboard) needs the tensorboard "\
        "package: pip install tensorboard\n"


@pytest.mark.parametrize("fused_lm_head", [True, False])
def test_train_step_applies_label_smoothing_and_z_loss(fused_lm_head):
    """The trainer's loss options reach the loss: train_step's loss is F.cross_entropy's with label
    smoothing, plus z_loss * logsumexp**2, on the logits before the step."""
    from gptfast.model import GPT
    from gptfast.train import make_optimizer, train_step

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50, n_layer=1, n_head=2, n_embd=32, context_length=8,
                          fused_lm_head=fused_lm_head))
    x, y = torch.randint(0, 50, (2, 3, 8))
    with torch.no_grad():
        logits, _ = model(x, y, return_logits=True)
        flat = logits.reshape(-1, 50)
        want = (torch.nn.functional.cross_entropy(flat, y.reshape(-1), label_smoothing=0.2)
                + 1e-2 * (flat.logsumexp(-1) ** 2).mean())
    loss, _ = train_step(model, make_optimizer(model, 1e-3), [(x, y)], lr=1e-3, label_smoothing=0.2, z_loss=1e-2)
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)


def test_loss_options_are_checked_and_reach_the_config(monkeypatch):
    from gptfast.train import TrainConfig

    with pytest.raises(ValueError, match=r"label_smoothing must be in \[0, 1\], got 1.5"):
        TrainConfig(label_smoothing=1.5)
    with pytest.raises(ValueError, match="z_loss must be a finite number >= 0, got -1"):
        TrainConfig(z_loss=-1)
    seen = {}
    monkeypatch.setattr("gptfast.cli.train", lambda cfg: seen.setdefault("cfg", cfg) and {})
    main(["train", "--label-smoothing", "0.1", "--z-loss", "0.001", "--max-steps", "1"])
    assert (seen["cfg"].label_smoothing, seen["cfg"].z_loss) == (0.1, 0.001)


def test_nondeterministic_reaches_the_model(monkeypatch, data_dir, tmp_path):
    """--nondeterministic reaches the config, and train() switches the model's attention to atomic dQ."""
    seen = {}
    monkeypatch.setattr("gptfast.cli.train", lambda cfg: seen.setdefault("cfg", cfg) and {})
    main(["train", "--nondeterministic", "--max-steps", "1"])
    assert seen["cfg"].deterministic is False
    monkeypatch.undo()
    built = []
    original = GPT.__init__

    def record(self, config):
        original(self, config)
        built.append(self)

    monkeypatch.setattr(GPT, "__init__", record)
    train(tiny(data_dir, tmp_path, max_steps=1, eval_interval=1, deterministic=False))
    assert built[0].config.deterministic_attention is False  # the trained model (others: the sample's)
    assert "deterministic_attention" not in built[0].config.to_dict()  # a run's choice: not in checkpoints
