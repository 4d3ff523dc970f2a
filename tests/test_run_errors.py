"""A run's files and device under a careless or hostile user (issue 30): a device that cannot run a
model, non-finite numbers in log.jsonl, a full disk, a file size limit (``ulimit -f``), an out-dir
that is not a folder, and log.jsonl's rename flushed with its folder. Each is one line naming the
option or the file, and loss.png failing never costs the checkpoint or the log."""

import errno
import os
import resource

import pytest
import torch

from gptfast.checkpoint import load_checkpoint, save_checkpoint
from gptfast.cli import main
from gptfast.outputs import LOG_FILE, PLOT_FILE
from gptfast.runlog import open_log, read_log, write_atomic
from gptfast.train import TrainConfig, train


def tiny(data_dir, out_dir, **overrides) -> TrainConfig:
    base = dict(data=[str(data_dir)], out_dir=str(out_dir), preset="tiny", context_length=16, batch_size=2,
                max_steps=2, warmup_steps=1, eval_interval=2, eval_batches=1, log_interval=1, sample_tokens=0,
                progress=False, backend="torch", device="cpu")
    return TrainConfig(**{**base, **overrides})


def one_error_line(capsys, command: str) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith(f"gptfast {command}: error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def fsync_failing_for(name: str, monkeypatch) -> None:
    """os.fsync reports a full disk (as it does for delayed allocation) for files called ``name`` only."""
    real_fsync = os.fsync

    def fsync(fd):
        if os.path.basename(os.path.realpath(f"/proc/self/fd/{fd}")) == name:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)


# --- item 10: a device that cannot run a model -----------------------------------------------------


@pytest.mark.parametrize("device, expected", [
    pytest.param("cuda", "--device 'cuda': this torch has no CUDA (CPU build", marks=pytest.mark.skipif(
        torch.version.cuda is not None, reason="this torch has CUDA")),
    ("tpu", "--device 'tpu': unknown device"),
    ("meta", "--device 'meta' cannot run a model"),
    ("xla", "--device 'xla': this torch"),
])
@pytest.mark.parametrize("command", ["generate", "eval"])
def test_generate_and_eval_refuse_a_device_that_cannot_run_a_model(command, device, expected, tmp_path, capsys):
    data = [str(tmp_path)] if command == "eval" else []
    assert main([command, *data, "--checkpoint", str(tmp_path / "ckpt.pt"), "--device", device]) == 2
    assert expected in one_error_line(capsys, command)


def test_train_refuses_the_meta_device(data_dir, tmp_path, capsys):
    assert main(["train", str(data_dir), "--out-dir", str(tmp_path), "--device", "meta"]) == 2
    assert "--device 'meta' cannot run a model" in one_error_line(capsys, "train")


# --- item 14: NaN and Infinity in log.jsonl ---------------------------------------------------------


def test_a_log_holding_nan_or_infinity_resumes_and_is_rewritten_as_null(tmp_path):
    path = tmp_path / LOG_FILE
    path.write_text('{"step": 1, "loss": NaN, "grad_norm": Infinity}\n{"step": 2, "loss": 1e999, "lr": -Infinity}\n'
                    '{"step": 3, "loss": 2.5}\n')
    open_log(path, resume_step=2).close()
    assert path.read_text() == ('{"step": 1, "loss": null, "grad_norm": null}\n'
                                '{"step": 2, "loss": null, "lr": null}\n')
    assert read_log(path)[0] == {"step": 1, "loss": None, "grad_norm": None}


# --- item 15: a full disk, a file size limit, an out-dir that is not a folder -----------------------


def test_a_full_disk_on_resume_names_the_log_and_keeps_it(tmp_path, monkeypatch):
    path = tmp_path / LOG_FILE
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n')
    fsync_failing_for(LOG_FILE + ".tmp", monkeypatch)
    with pytest.raises(OSError, match=rf"no space left writing {path} \(needs 0.0 KB, [\d,]+ MB free\)") as error:
        open_log(path, resume_step=1)
    assert error.value.errno == errno.ENOSPC
    assert read_log(path) == [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}]
    assert not list(tmp_path.glob("*.tmp"))


def test_a_loss_plot_that_cannot_be_written_is_a_warning(data_dir, tmp_path, monkeypatch, capsys):
    pytest.importorskip("matplotlib")
    fsync_failing_for(PLOT_FILE + ".tmp", monkeypatch)
    summary = train(tiny(data_dir, tmp_path))
    err = capsys.readouterr().err
    assert f"warning: no loss plot: no space left writing {tmp_path / PLOT_FILE} (needs" in err
    assert summary["step"] == 2 and load_checkpoint(tmp_path)["step"] == 2
    assert [r["step"] for r in read_log(tmp_path / LOG_FILE)] == [1, 2, 2]
    assert not (tmp_path / PLOT_FILE).exists() and not list(tmp_path.glob("*.tmp"))


@pytest.fixture
def file_size_limit():
    """Lower this process's file size limit (``ulimit -f``) to 64 KB for one test. Python ignores
    SIGXFSZ, so a write past the limit fails with EFBIG instead of killing the process."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, hard))
    yield
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def test_the_file_size_limit_is_one_line_naming_the_file(tmp_path, file_size_limit):
    with pytest.raises(OSError) as log_error:
        write_atomic(tmp_path / LOG_FILE, "x" * (100 << 10))
    with pytest.raises(OSError) as checkpoint_error:
        save_checkpoint(tmp_path, {"step": 1, "model": {"w": torch.zeros(1 << 18)}})  # 1 MB
    for error, name in ((log_error.value, LOG_FILE), (checkpoint_error.value, "ckpt.pt")):
        message = str(error)
        assert message.startswith(f"could not write {tmp_path / name}: it needs ") and "enforce" not in message
        assert "files of 64.0 KB at most (ulimit -f)" in message and error.errno == errno.EFBIG
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("make, what", [
    (lambda p: p.write_text(""), "is a file, not a folder"),
    (lambda p: p.symlink_to(p.parent / "gone"), "is a symbolic link to {parent}/gone, which does not exist"),
])
def test_an_out_dir_that_is_not_a_folder_is_one_line(make, what, data_dir, tmp_path, capsys):
    out = tmp_path / "out"
    make(out)
    for target, where in ((out, f"--out-dir {out}"), (out / "sub", f"--out-dir {out / 'sub'}: {out}")):
        assert main(["train", str(data_dir), "--out-dir", str(target), "--device", "cpu"]) == 2
        line = one_error_line(capsys, "train")
        assert f"{where} {what.format(parent=tmp_path)}" in line and "Errno" not in line, line


# --- item 18: log.jsonl's rename is flushed with its folder --------------------------------------


def test_the_log_rewrite_flushes_the_file_and_its_folder(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(os.path.realpath(f"/proc/self/fd/{fd}"))
                        or real_fsync(fd))
    (tmp_path / LOG_FILE).write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n')
    open_log(tmp_path / LOG_FILE, resume_step=1).close()
    assert synced == [str(tmp_path / (LOG_FILE + ".tmp")), str(tmp_path)]


def test_a_loss_plot_of_a_run_with_no_logged_loss_warns_of_nothing(tmp_path):
    """A run shorter than its log interval has no points: the plot is still written, without matplotlib's
    "No artists with labels" warning."""
    import warnings

    from gptfast.runlog import plot_losses

    log = tmp_path / "log.jsonl"
    log.write_text('{"step": 0, "lr": 0.001}\n')
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert plot_losses(log, tmp_path / "loss.png") == tmp_path / "loss.png"
    assert (tmp_path / "loss.png").read_bytes().startswith(b"\x89PNG")
