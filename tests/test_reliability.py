"""What a run survives: divergence, kills during writes, interrupted preparation, two trainers, a full
disk, damaged and foreign files, signals, lost peers; and the one-line errors of the CLI for each."""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import gptfast.checkpoint as checkpoint
import gptfast.data as data
from gptfast.checkpoint import load_checkpoint, save_checkpoint
from gptfast.cli import main
from gptfast.data import TokenData, prepare
from gptfast.distributed import PeerFailure, World, peers_watched
from gptfast.interrupt import Interrupted, StopRequest
from gptfast.runlog import LOG_FILE, RunLog, open_log, read_log, write_atomic
from gptfast.train import TrainConfig, train

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(data_dir, out_dir, **overrides) -> TrainConfig:
    base = dict(data=[str(data_dir)], out_dir=str(out_dir), preset="tiny", context_length=32, batch_size=8,
                max_steps=20, warmup_steps=5, lr=3e-3, eval_interval=10, eval_batches=1, log_interval=1,
                sample_tokens=0, progress=False, backend="torch", device="cpu")
    return TrainConfig(**{**base, **overrides})


def cli_train_args(data_dir, out_dir, *extra) -> list[str]:
    return ["train", str(data_dir), "--out-dir", str(out_dir), "--context-length", "32", "--batch-size", "8",
            "--max-steps", "20", "--warmup-steps", "5", "--eval-interval", "10", "--eval-batches", "1",
            "--sample-tokens", "0", "--no-progress", "--backend", "torch", "--device", "cpu", *extra]


def one_error_line(capsys, command: str) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith(f"gptfast {command}: error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# --- 1. divergence never replaces the last good checkpoint --------------------------------------


def test_a_diverging_run_keeps_the_last_good_checkpoint(data_dir, tmp_path, capsys):
    train(tiny(data_dir, tmp_path, run_steps=10))
    good = load_checkpoint(tmp_path)["model"]
    assert main(cli_train_args(data_dir, tmp_path, "--resume", "--lr", "1e3", "--run-steps", "5")) == 2
    line = one_error_line(capsys, "train")
    assert "the weights hold NaN or Inf" in line and "still holds step 10" in line and "lower --lr" in line
    kept = load_checkpoint(tmp_path)
    assert kept["step"] == 10 and all(torch.equal(good[k], kept["model"][k]) for k in good)
    # The log holds valid JSON only, and a good resume goes on from step 10.
    assert all(r["step"] <= 20 for r in read_log(tmp_path / LOG_FILE))
    assert train(tiny(data_dir, tmp_path, resume=True))["step"] == 20


def test_a_non_finite_validation_loss_or_optimizer_state_is_not_saved(data_dir, tmp_path):
    from gptfast.run import start_run

    run = start_run(tiny(data_dir, tmp_path, max_steps=2), World(), torch.device("cpu"))
    run.runner = run.model
    run.train_one_step()
    assert run.nonfinite(None) is None
    with pytest.raises(FloatingPointError, match="step 1: the validation loss is nan.*no checkpoint was written"):
        run.save(float("nan"))
    next(iter(run.optimizer.state.values()))["exp_avg"].view(-1)[0] = float("inf")
    with pytest.raises(FloatingPointError, match="the optimizer state holds NaN or Inf"):
        run.save(1.0)
    assert not (tmp_path / "ckpt.pt").exists()


# --- 2. log.jsonl: atomic rewrite, a cut last line, no NaN ------------------------------------------


def test_resume_tolerates_a_log_cut_mid_line(data_dir, tmp_path, capsys):
    train(tiny(data_dir, tmp_path, max_steps=4, eval_interval=2, run_steps=2))
    with open(tmp_path / LOG_FILE, "a") as log:
        log.write('{"step": 3, "loss": 2.5, "l')  # killed while writing
    assert train(tiny(data_dir, tmp_path, max_steps=4, eval_interval=2, resume=True))["step"] == 4
    assert "log.jsonl, line 4: dropped, not a whole record" in capsys.readouterr().err
    assert [r["step"] for r in read_log(tmp_path / LOG_FILE)] == [1, 2, 2, 3, 4, 4]


def test_a_bad_log_line_inside_names_the_file_and_line(tmp_path):
    (tmp_path / LOG_FILE).write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss"\n{"step": 3, "loss": 1.0}\n')
    with pytest.raises(ValueError, match=r"log.jsonl, line 2: not a log record"):
        open_log(tmp_path / LOG_FILE, resume_step=3)


def test_an_interrupted_log_rewrite_leaves_the_old_log(tmp_path, monkeypatch):
    path = tmp_path / LOG_FILE
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n')
    before = path.read_text()

    def killed(fd):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", killed)
    with pytest.raises(KeyboardInterrupt):
        write_atomic(path, '{"step": 1, "loss": 2.0}\n')
    assert path.read_text() == before and not list(tmp_path.glob("*.tmp"))


def test_the_log_never_holds_nan(tmp_path):
    with RunLog(tmp_path, main=True, resume_step=None, step=0, max_steps=2, progress=False) as log:
        log.train(1, float("nan"), 1e-3, float("inf"), 10.0, None)
        log.validation(1, float("inf"), None)

    def strict(constant):
        raise AssertionError(f"{constant} is not JSON")

    records = [json.loads(line, parse_constant=strict) for line in (tmp_path / LOG_FILE).read_text().splitlines()]
    assert records[0]["loss"] is None and records[0]["grad_norm"] is None and records[1]["val_loss"] is None


# --- 3. prepared folders: meta.json last, checked; never read as text -------------------------------


def test_a_folder_with_tokens_but_no_meta_is_refused(data_dir, tmp_path, capsys):
    broken = tmp_path / "broken"
    broken.mkdir()
    shutil.copy(data_dir / "tokens.bin", broken / "tokens.bin")
    with pytest.raises(ValueError, match="holds tokens.bin but no meta.json: an interrupted"):
        TokenData(broken)
    assert main(cli_train_args(broken, tmp_path / "out")) == 2  # not trained on as text
    assert "holds tokens.bin but no meta.json (an interrupted `gptfast prepare`?)" in one_error_line(capsys, "train")
    assert not (tmp_path / "out" / "data" / "tokens.bin").exists()


def test_an_interrupted_prepare_keeps_the_old_folder_or_leaves_a_refused_one(tmp_path, monkeypatch):
    (tmp_path / "a.txt").write_text("first text\n" * 50)
    prepare([tmp_path / "a.txt"], tmp_path / "d")
    before = (tmp_path / "d" / "tokens.bin").read_bytes()
    (tmp_path / "a.txt").write_text("other words\n" * 50)

    def killed(self, text):
        raise KeyboardInterrupt

    monkeypatch.setattr(data.CharTokenizer, "encode", killed)  # killed while tokenizing
    with pytest.raises(KeyboardInterrupt):
        prepare([tmp_path / "a.txt"], tmp_path / "d")
    monkeypatch.undo()
    assert (tmp_path / "d" / "tokens.bin").read_bytes() == before and TokenData(tmp_path / "d").meta
    assert not (tmp_path / "d" / "tokens.bin.tmp").exists()
    monkeypatch.setattr(data, "_write_json_atomic", lambda path, obj: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):  # killed between tokens.bin and meta.json
        prepare([tmp_path / "a.txt"], tmp_path / "d")
    with pytest.raises(ValueError, match="no meta.json"):
        TokenData(tmp_path / "d")


def test_prepare_never_reads_its_own_output(tmp_path):
    texts = tmp_path / "texts"
    texts.mkdir()
    (texts / "a.txt").write_text("some text\n" * 40)
    first = prepare([texts], texts / "data")
    again = prepare([texts], texts / "data")  # the folder now holds data/tokens.bin and data/meta.json
    assert first["sources"] == again["sources"] == [str(texts / "a.txt")]
    assert first["num_tokens"] == again["num_tokens"]
    # Training on a folder that holds its own out_dir never reads the checkpoint or the log.
    train(tiny(None, texts / "out", data=[str(texts)], context_length=8, max_steps=2, eval_interval=2))
    again = TokenData(texts / "out" / "data").meta["sources"]
    summary = train(tiny(None, texts / "out", data=[str(texts)], context_length=8, max_steps=2, eval_interval=2,
                         overwrite=True))
    assert summary["step"] == 2 and TokenData(texts / "out" / "data").meta["sources"] == again
    with pytest.raises(ValueError, match="holds token ids written by `gptfast prepare`, not text"):
        prepare([texts / "data" / "tokens.bin"], tmp_path / "x")


# --- 4. one trainer per out_dir ----------------------------------------------------------------------


def test_a_second_trainer_on_one_out_dir_is_refused_naming_the_holder(data_dir, tmp_path, capsys):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path\n"
         "from gptfast.checkpoint import out_dir_lock\n"
         "with out_dir_lock(Path(sys.argv[1]), True):\n    print('locked', flush=True); time.sleep(60)",
         str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(BlockingIOError, match=f"in use by another training run \\(pid {holder.pid}\\)"):
            train(tiny(data_dir, tmp_path, max_steps=1))
        assert main(cli_train_args(data_dir, tmp_path, "--max-steps", "1")) == 2
        assert f"(pid {holder.pid})" in one_error_line(capsys, "train")
    finally:
        holder.kill()  # as kill -9: the lock dies with its process
        holder.wait()
    assert train(tiny(data_dir, tmp_path, max_steps=1))["step"] == 1


# --- 5. a full disk ------------------------------------------------------------------------------------


def test_a_full_disk_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    save_checkpoint(tmp_path, {"step": 1, "model": {"w": torch.zeros(10)}})
    free = [10 << 30]
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(0, 0, free[0]))

    def fills_the_disk(obj, f):
        f.write(b"PK\x03\x04 partial")
        free[0] = 0
        raise RuntimeError("[enforce fail at inline_container.cc:858] . PytorchStreamWriter failed writing file "
                           "data/0: file write failed")

    monkeypatch.setattr(checkpoint.torch, "save", fills_the_disk)
    big = {"step": 2, "model": {"w": torch.zeros(1 << 20)}}  # 4 MB
    with pytest.raises(OSError, match=r"no space left writing .*ckpt.pt \(needs 5 MB, 0 MB free\)") as error:
        save_checkpoint(tmp_path, big)
    assert error.value.errno == errno.ENOSPC
    assert not (tmp_path / "ckpt.pt.tmp").exists() and load_checkpoint(tmp_path)["step"] == 1
    free[0] = 1 << 20  # less than the checkpoint needs: refused before writing anything
    with pytest.raises(OSError, match="no space left"):
        save_checkpoint(tmp_path, big)
    assert load_checkpoint(tmp_path)["step"] == 1


def test_a_checkpoint_is_flushed_before_and_after_its_rename(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(os.path.realpath(f"/proc/self/fd/{fd}"))
                        or real_fsync(fd))
    save_checkpoint(tmp_path, {"step": 1})
    assert synced == [str(tmp_path / "ckpt.pt.tmp"), str(tmp_path)]


# --- clear errors: damaged and foreign files ------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("trained")
    train(tiny(data_dir, out, max_steps=2, eval_interval=2))
    return out


@pytest.mark.parametrize("edit, words", [
    (lambda s: s.pop("model"), "has no 'model' field"),
    (lambda s: s.pop("tokenizer"), "has no 'tokenizer' field"),
    (lambda s: s.update(step="12"), "field 'step' is str, expected int"),
    (lambda s: s["model_config"].update(n_embd="128"), "field 'n_embd' is '128', expected int"),
    (lambda s: s["model_config"].update(vocab_size=10**11), "more than this machine's"),
    (lambda s: s["model"].update({"lm_head.weight": s["model"]["lm_head.weight"].long()}),
     "tensor 'lm_head.weight' is torch.int64, not a floating-point tensor"),
])
def test_a_damaged_checkpoint_is_one_line_on_every_command(trained, data_dir, tmp_path, capsys, edit, words):
    state = torch.load(trained / "ckpt.pt", weights_only=True)
    edit(state)
    out = tmp_path / "run"
    out.mkdir()
    torch.save(state, out / "ckpt.pt")
    for argv, command in ((["eval", str(data_dir), "--checkpoint", str(out), "--device", "cpu"], "eval"),
                          (["generate", "--checkpoint", str(out), "-n", "2", "--device", "cpu"], "generate"),
                          (cli_train_args(data_dir, out, "--resume", "--max-steps", "4"), "train")):
        assert main(argv) == 2
        line = one_error_line(capsys, command)
        assert str(out / "ckpt.pt") in line and words in line, line


@pytest.mark.parametrize("content, words", [
    (b"hello, not a checkpoint\n", "is not a gptfast checkpoint: it is not a file torch.save writes"),
    (b"", "is empty"),
    (None, "is damaged (truncated or corrupt)"),
])
def test_a_file_that_is_not_a_checkpoint(trained, data_dir, tmp_path, capsys, content, words):
    path = tmp_path / "file.pt"
    path.write_bytes(content if content is not None else (trained / "ckpt.pt").read_bytes()[:5000])
    assert main(["eval", str(data_dir), "--checkpoint", str(path), "--device", "cpu"]) == 2
    line = one_error_line(capsys, "eval")
    assert words in line and "weights_only" not in line


@pytest.mark.parametrize("edit, words", [
    (lambda m: m.pop("dtype"), "meta.json: no 'dtype' field"),
    (lambda m: m.update(dtype="float64"), "field 'dtype' is 'float64'"),
    (lambda m: m.update(tokenizer={"kind": "char"}), "a char tokenizer needs 'chars'"),
    (lambda m: m.update(num_tokens="many"), "field 'num_tokens' is 'many'"),
])
def test_a_damaged_meta_json_names_the_file_and_field(data_dir, tmp_path, capsys, edit, words):
    folder = tmp_path / "d"
    shutil.copytree(data_dir, folder)
    meta = json.loads((folder / "meta.json").read_text())
    edit(meta)
    (folder / "meta.json").write_text(json.dumps(meta))
    assert main(cli_train_args(folder, tmp_path / "out")) == 2
    assert words in one_error_line(capsys, "train")


def test_bad_json_and_a_cut_tokens_file_name_the_file(data_dir, tmp_path):
    folder = tmp_path / "d"
    shutil.copytree(data_dir, folder)
    (folder / "meta.json").write_text('{"dtype": "uint16",\n "num_tokens" 5}')
    with pytest.raises(ValueError, match=r"d/meta.json: not valid JSON \(line 2, column 15"):
        TokenData(folder)
    shutil.copy(data_dir / "meta.json", folder / "meta.json")
    with open(folder / "tokens.bin", "ab") as f:
        f.write(b"\x01")
    with pytest.raises(ValueError, match=r"tokens.bin: \d+ bytes, not a whole number of uint16 tokens"):
        TokenData(folder)


def test_token_ids_outside_the_vocabulary_are_found_on_opening(data_dir, tmp_path):
    folder = tmp_path / "d"
    shutil.copytree(data_dir, folder)
    meta = json.loads((folder / "meta.json").read_text())
    tokens = np.fromfile(folder / "tokens.bin", dtype=np.uint16)
    split = len(tokens) - meta["num_val_tokens"]
    tokens[split + 7] = 60000
    tokens.tofile(folder / "tokens.bin")
    vocab = len(meta["tokenizer"]["chars"])
    with pytest.raises(ValueError, match=f"token id 60000 at offset {split + 7} \\(validation split, offset 7\\) is "
                                         f"outside the vocabulary of {vocab}"):
        TokenData(folder)


def test_utf8_error_offsets_are_exact_at_block_edges(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "BLOCK_BYTES", 8)
    cases = {b"abcdefgh\xff": 8,  # the first byte of the second block
             b"abcdefg\xe2(xyz": 7,  # a sequence begun at the end of a block, broken in the next
             b"abcdefg\xe2\x82(": 7,
             b"abc\n\xe2\x82": 4,  # a truncated final sequence
             b"abcdefgh\xe2\x82": 8}
    for i, (raw, offset) in enumerate(cases.items()):
        (tmp_path / f"{i}.txt").write_bytes(raw)
        with pytest.raises(ValueError, match=f"byte offset {offset} "):
            prepare([tmp_path / f"{i}.txt"], tmp_path / "out")


def test_a_text_without_line_breaks_is_read_in_bounded_blocks(tmp_path, monkeypatch):
    words = " ".join(f"word{i % 977}" for i in range(400_000))  # 3.6 MB on one line
    (tmp_path / "line.txt").write_text(words)
    blocks = list(data._read_blocks(tmp_path / "line.txt"))
    assert "".join(blocks) == words and max(map(len, blocks)) <= 2 * data.BLOCK_BYTES
    assert all(b.startswith(" ") for b in blocks[1:])  # cut before a space: GPT-2's tokens are unchanged
    if os.environ.get("GPTFAST_TIKTOKEN_FILE"):
        from gptfast.tokenizer import GPT2Tokenizer

        monkeypatch.setattr(data, "BLOCK_BYTES", 1000)
        tok, text = GPT2Tokenizer(), words[:50_000]
        (tmp_path / "short.txt").write_text(text)
        assert sum((tok.encode(b) for b in data._read_blocks(tmp_path / "short.txt")), []) == tok.encode(text)


# --- resume: options that contradict the checkpoint -------------------------------------------------------


def test_resume_with_contradicting_options_lists_each_conflict(data_dir, tmp_path, capsys):
    first = tiny(data_dir, tmp_path / "split", max_steps=4, eval_interval=2, run_steps=2, dropout=0.1)
    train(first)
    with pytest.raises(ValueError) as error:
        train(tiny(data_dir, tmp_path / "split", max_steps=4, resume=True, batch_size=4, preset="mini",
                   order="sequential", seed=1, dropout=0.0, grad_accum=2))
    for conflict in ("batch_size=4 (the checkpoint's: 8)", "preset='mini' (the checkpoint's: 'tiny')",
                     "order='sequential'", "seed=1", "dropout=0.0 (the checkpoint's: 0.1)", "grad_accum=2 x 1"):
        assert conflict in str(error.value)
    assert main(cli_train_args(data_dir, tmp_path / "split", "--resume", "--batch-size", "4")) == 2
    assert "--batch-size 4 (the checkpoint's: 8)" in one_error_line(capsys, "train")
    # Left out, they are the checkpoint's (and the run goes on exactly); an option that may change is
    # applied and said.
    resumed = train(TrainConfig(out_dir=str(tmp_path / "split"), resume=True, max_steps=4, lr=3e-3, warmup_steps=5,
                                eval_interval=1, eval_batches=1, log_interval=1, sample_tokens=0, progress=False,
                                backend="torch", device="cpu"))
    out = capsys.readouterr().out
    assert "resuming with changed options: eval_interval 2 -> 1" in out and "model: tiny (" in out
    straight = train(tiny(data_dir, tmp_path / "straight", max_steps=4, eval_interval=2, dropout=0.1))
    assert resumed["step"] == 4 and resumed["loss"] == straight["loss"]
    with pytest.raises(ValueError, match="data=.*the checkpoint's"):
        train(tiny(tmp_path / "elsewhere", tmp_path / "split", max_steps=6, resume=True))


def test_a_plain_resume_continues_the_run_as_it_was(data_dir, tmp_path, capsys):
    """Options that may change on resume change only when given (issue 30): a plain --resume keeps
    the checkpoint's schedule, not the command line's defaults; each given change is printed."""
    argv = ["train", str(data_dir), "--out-dir", str(tmp_path), "--context-length", "32", "--batch-size", "8",
            "--eval-batches", "1", "--sample-tokens", "0", "--no-progress", "--backend", "torch", "--device", "cpu"]
    assert main(argv + ["--lr", "3e-4", "--max-steps", "6", "--warmup-steps", "2", "--eval-interval", "2",
                        "--run-steps", "2"]) == 0
    assert main(argv + ["--resume", "--run-steps", "2"]) == 0
    out = capsys.readouterr().out
    assert "resuming with changed options" not in out and "resuming at step 2" in out
    assert load_checkpoint(tmp_path)["step"] == 4
    saved = load_checkpoint(tmp_path)["train_config"]
    assert (saved["lr"], saved["max_steps"], saved["warmup_steps"], saved["eval_interval"]) == (3e-4, 6, 2, 2)
    assert main(argv + ["--resume", "--lr", "1e-3", "--max-steps", "6", "--dtype", "fp32"]) == 0
    out = capsys.readouterr().out
    assert "resuming with changed options: lr 0.0003 -> 0.001, dtype 'auto' -> 'float32'\n" in out
    # From Python: fields not passed are the checkpoint's too.
    summary = train(TrainConfig(out_dir=str(tmp_path), resume=True, max_steps=7, sample_tokens=0, progress=False,
                                backend="torch", device="cpu"))
    assert summary["step"] == 7 and "resuming with changed options: max_steps 6 -> 7\n" in capsys.readouterr().out
    assert load_checkpoint(tmp_path)["train_config"]["lr"] == 1e-3


def test_tokens_per_step_is_saved_as_the_accumulation_it_sets(data_dir, tmp_path):
    """A resumed run without --tokens-per-step takes the steps the first run took."""
    train(tiny(data_dir, tmp_path, tokens_per_step=2 * 8 * 32, max_steps=4, eval_interval=2, run_steps=2))
    assert load_checkpoint(tmp_path)["train_config"]["grad_accum"] == 2
    straight = train(tiny(data_dir, tmp_path / "straight", grad_accum=2, max_steps=4, eval_interval=2))
    assert train(tiny(data_dir, tmp_path, max_steps=4, eval_interval=2, resume=True))["loss"] == straight["loss"]


def test_a_tokens_per_step_checkpoint_of_an_older_version_resumes_at_its_accumulation(data_dir, tmp_path, capsys):
    """Older versions saved tokens_per_step with grad_accum 1, the accumulation it set kept apart: a
    plain resume takes the steps it set, and repeating tokens_per_step agrees with it."""
    tokens = 2 * 8 * 32
    train(tiny(data_dir, tmp_path / "old", tokens_per_step=tokens, max_steps=4, eval_interval=2, run_steps=2))
    state = load_checkpoint(tmp_path / "old")
    old_config = {**state["train_config"], "tokens_per_step": tokens, "grad_accum": 1}  # as the old code wrote it
    save_checkpoint(tmp_path / "old", {**state, "train_config": old_config})
    shutil.copytree(tmp_path / "old", tmp_path / "again")
    straight = train(tiny(data_dir, tmp_path / "straight", grad_accum=2, max_steps=4, eval_interval=2))
    plain = train(tiny(data_dir, tmp_path / "old", max_steps=4, eval_interval=2, resume=True))
    repeated = train(tiny(data_dir, tmp_path / "again", tokens_per_step=tokens, max_steps=4, eval_interval=2,
                          resume=True))
    assert plain["loss"] == repeated["loss"] == straight["loss"]
    assert capsys.readouterr().out.count("512 tokens per step = 1 process(es) x 2 micro-batch(es)") == 4  # each run
    assert main(cli_train_args(data_dir, tmp_path / "again", "--resume", "--max-steps", "4", "--grad-accum", "1")) == 2
    assert "--grad-accum 1 x 1 process(es) (the checkpoint's: 2 x 1)" in one_error_line(capsys, "train")
    # A config made for a new run and resumed later takes what it was not given from the checkpoint.
    later = TrainConfig(out_dir=str(tmp_path / "old"), max_steps=5, sample_tokens=0, progress=False, backend="torch",
                        device="cpu")
    later.resume = True
    assert train(later)["step"] == 5 and "x 2 micro-batch(es) x 8 x 32" in capsys.readouterr().out


def damage_optimizer_moment(state: dict) -> None:
    first = next(iter(state["optimizer"]["state"].values()))
    first["exp_avg"] = torch.zeros(3, 5)


@pytest.mark.parametrize("edit, words", [
    (damage_optimizer_moment, "the optimizer's exp_avg of transformer.wte.weight has shape (3, 5), the parameter ("),
    (lambda s: s["train_config"].update(batch_size="8"), "train_config field 'batch_size' must be an integer, got '8'"),
    (lambda s: s["train_config"].update(data=5), "train_config field 'data' must be a list of strings, got 5"),
    (lambda s: s["train_config"].update(seed="x"), "train_config field 'seed' must be an integer, got 'x'"),
    (lambda s: s["train_config"].update(max_steps=-1), "train_config field 'max_steps' must be positive, got -1"),
    (lambda s: s["train_config"].update(lr=float("nan")), "train_config field 'lr' must be a finite number"),
    (lambda s: s["train_config"].update(order="zigzag"), "field 'order' must be one of random, sequential"),
    (lambda s: s["train_config"].update(grad_accum=None), "field 'grad_accum' must be an integer, got None"),
    (lambda s: s["model_config"].update(context_length=0), "model_config field 'context_length' must be positive"),
    (lambda s: s.update(processes=0), "field 'processes' must be positive, got 0"),
    (lambda s: s.update(data_meta=[1]), "field 'data_meta' is list, expected dict"),
])
def test_a_damaged_training_state_is_one_line_naming_the_checkpoint(trained, data_dir, tmp_path, capsys, edit,
                                                                     words):
    """Every train_config field a resumed run reads is checked against its option's declaration, and
    the optimizer's moments against the parameters' shapes, before anything is loaded (issue 30)."""
    state = torch.load(trained / "ckpt.pt", weights_only=True)
    edit(state)
    torch.save(state, tmp_path / "ckpt.pt")
    argv = cli_train_args(data_dir, tmp_path, "--resume", "--max-steps", "4")
    if "data_meta" in words:  # read only to check a data folder given in place of the checkpoint's
        argv[1] = str(tmp_path / "moved")
        shutil.copytree(data_dir, argv[1])
    assert main(argv) == 2
    line = one_error_line(capsys, "train")
    assert f"{tmp_path / 'ckpt.pt'} is damaged: " in line and words in line, line


def test_a_checkpoint_s_options_are_read_as_the_constructor_reads_them(trained, data_dir):
    """Normalised as TrainConfig(...) does before they are checked: an older "bf16", a path as a string."""
    from gptfast.resume import saved_options

    state = load_checkpoint(trained)
    state["train_config"].update(dtype="bf16", data=str(data_dir))
    saved = saved_options(state, trained / "ckpt.pt")
    assert (saved["dtype"], saved["data"], saved["batch_size"]) == ("bfloat16", [str(data_dir)], 8)


def test_a_moved_data_folder_resumes_when_named_and_other_data_is_refused(data_dir, tmp_path, capsys):
    """A data folder moved since the checkpoint resumes when given as DATA, checked against the
    meta.json the checkpoint records (so its tokens' count and size); other data is refused naming both."""
    first = tmp_path / "first"
    shutil.copytree(data_dir, first)
    assert main(cli_train_args(first, tmp_path / "run", "--max-steps", "4", "--eval-interval", "2",
                               "--run-steps", "2")) == 0
    shutil.copytree(tmp_path / "run", tmp_path / "older")
    moved = first.rename(tmp_path / "moved")
    plain_resume = ["train", "--out-dir", str(tmp_path / "run"), "--resume", "--no-progress", "--device", "cpu"]
    assert main(plain_resume) == 2  # without DATA: a line saying where to give the moved folder
    assert f"data {first} is gone: if it moved, give its new place as DATA" in one_error_line(capsys, "train")
    other = tmp_path / "other"
    prepare([__file__], other)
    assert main(cli_train_args(other, tmp_path / "run", "--resume", "--max-steps", "4")) == 2
    line = one_error_line(capsys, "train")
    assert f"DATA ['{other}'] (the checkpoint's: ['{first}']: other data, {other}'s meta.json differs in" in line
    assert main(cli_train_args(moved, tmp_path / "run", "--resume", "--max-steps", "4")) == 0
    assert f"resuming with changed options: data ['{first}'] -> ['{moved}'], eval_interval" in capsys.readouterr().out
    assert load_checkpoint(tmp_path / "run")["train_config"]["data"] == [str(moved)]
    # A checkpoint of an older version records no meta.json: the old folder, gone, cannot vouch for the new one.
    state = load_checkpoint(tmp_path / "older")
    del state["data_meta"]
    save_checkpoint(tmp_path / "older", state)
    assert main(cli_train_args(moved, tmp_path / "older", "--resume", "--max-steps", "4")) == 2
    assert "records no meta.json of its data" in one_error_line(capsys, "train")


def test_options_are_declared_once():
    """The command line, the resume lists and the defaults come from TrainConfig's field declarations."""
    from gptfast.cli import build_parser
    from gptfast.config import CHANGEABLE_ON_RESUME, DEFAULTS, FIXED_ON_RESUME, OPTIONS

    train_parser = build_parser()._subparsers._group_actions[0].choices["train"]
    dests = {action.dest for action in train_parser._actions} - {"help"}
    assert dests == set(OPTIONS) == {f.name for f in __import__("dataclasses").fields(TrainConfig)}
    assert set(FIXED_ON_RESUME) | set(CHANGEABLE_ON_RESUME) <= set(DEFAULTS) | {"data", "init_from",
                                                                              "context_length", "min_lr"}
    assert not set(FIXED_ON_RESUME) & set(CHANGEABLE_ON_RESUME)
    assert TrainConfig(dtype="bf16").dtype == "bfloat16" and TrainConfig(data="notes.txt").data == ["notes.txt"]
    assert train_parser.parse_args(["--dtype", "fp16"]).dtype == "float16"


# --- signals and lost peers --------------------------------------------------------------------------------


def test_signals_stop_then_abort(capsys):
    with StopRequest() as stop:
        stop._handle(signal.SIGINT, None)
        assert stop.requested and stop.signum == signal.SIGINT
        stop._handle(signal.SIGTERM, None)  # torchrun passing the Ctrl-C on: still just stopping
        with pytest.raises(Interrupted) as error:
            stop._handle(signal.SIGINT, None)
    assert error.value.signum == signal.SIGINT and isinstance(error.value, KeyboardInterrupt)
    assert capsys.readouterr().err.count("Ctrl-C: stopping after this step (Ctrl-C again to abort)") == 1


def test_sigterm_saves_and_exits_143_and_a_second_one_keeps_the_checkpoint(data_dir, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for signals in (1, 2):
        out = tmp_path / f"run{signals}"
        argv = cli_train_args(data_dir, out, "--max-steps", "100000", "--eval-interval", "3", "--log-interval", "1")
        process = subprocess.Popen([sys.executable, "-m", "gptfast", *argv], env=env, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 120
            while not ((out / "ckpt.pt").is_file() and (out / LOG_FILE).read_text().count("\n") >= 8):
                assert process.poll() is None and time.monotonic() < deadline, process.communicate()[1]
                time.sleep(0.1)
            for _ in range(signals):
                process.send_signal(signal.SIGTERM)
            _, stderr = process.communicate(timeout=60)
        finally:
            if process.poll() is None:
                process.kill()
        assert process.returncode == 143 and "Traceback" not in stderr, stderr[-2000:]
        assert load_checkpoint(out)["step"] >= 3 and not (out / "ckpt.pt.tmp").exists()


def test_a_lost_peer_is_one_clear_error():
    with pytest.raises(PeerFailure, match=r"rank 1: lost contact .*Timed out waiting 3000ms.*within the 5 s"):
        with peers_watched(World(rank=1, size=2), 5):
            raise RuntimeError("[../gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 3000ms for recv")
    with pytest.raises(RuntimeError, match="a bug"):  # not a collective failure: untouched
        with peers_watched(World(rank=1, size=2), 5):
            raise RuntimeError("a bug")


def test_cuda_on_a_cpu_build_of_torch_is_one_line(data_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", None)
    argv = cli_train_args(data_dir, tmp_path)
    argv[argv.index("--device") + 1] = "cuda"
    assert main(argv) == 2
    assert "device 'cuda': this torch" in one_error_line(capsys, "train")
