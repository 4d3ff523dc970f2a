"""What data preparation refuses or reads once: a run's own output, damaged meta.json fields, devices,
FIFOs, an empty name, a file given twice; each error one line from the CLI, exit 2."""

import json
import os
import shutil

import pytest

from gptfast.cli import main
from gptfast.config import TrainConfig
from gptfast.data import TokenData, prepare
from gptfast.distributed import World
from gptfast.outputs import CHECKPOINT_FILE, LOG_FILE, PLOT_FILE, TENSORBOARD_DIR
from gptfast.setup_run import open_data

TEXT = "plain training text\n" * 20


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    folder = tmp_path_factory.mktemp("prepared")
    (folder / "a.txt").write_text(TEXT)
    prepare([folder / "a.txt"], folder / "data")
    return folder / "data"


def one_error_line(capsys, command: str) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith(f"gptfast {command}: error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# --- item 4: a run never trains on what it wrote -----------------------------------------------------


def test_a_run_writing_into_its_text_folder_never_reads_its_output(tmp_path, capsys):
    texts = tmp_path / "t2"  # `gptfast train t2 --out-dir t2 --overwrite`, after a first run there
    (texts / TENSORBOARD_DIR).mkdir(parents=True)
    (texts / "a.txt").write_text(TEXT)
    for name in (LOG_FILE, LOG_FILE + ".tmp", PLOT_FILE, CHECKPOINT_FILE, f"{TENSORBOARD_DIR}/events.out"):
        (texts / name).write_text('{"step": 1, "loss": 2.5}\n')  # what a run writes, text or not
    cfg = TrainConfig(data=[str(texts)], out_dir=str(texts), overwrite=True)
    assert open_data(cfg, World()).meta["sources"] == [str(texts / "a.txt")]
    assert "warning" not in capsys.readouterr().err
    for name in (LOG_FILE, TENSORBOARD_DIR):  # named, it is refused rather than read
        with pytest.raises(ValueError, match=f"{name}' is written by the run into its out-dir, not text"):
            prepare([texts / name], tmp_path / "x", skip=[texts])


# --- item 5: every meta.json field checked -----------------------------------------------------------


@pytest.mark.parametrize("edit, words", [
    (lambda m: m["tokenizer"].update(chars=m["tokenizer"]["chars"] + m["tokenizer"]["chars"][0]),
     "field 'tokenizer': 'chars' repeats"),
    (lambda m: m["tokenizer"].update(chars=m["tokenizer"]["chars"][::-1]), "'chars' is out of order at"),
    (lambda m: m.update(format=99), "field 'format' is 99, expected 1"),
    (lambda m: m.update(format="1"), "field 'format' is '1', expected an integer"),
    (lambda m: m.pop("format"), "no 'format' field"),
    (lambda m: m.update(sources="a.txt"), "field 'sources' is 'a.txt', expected a list"),
    (lambda m: m.update(sources=[1]), "field 'sources' is [1], expected a list of file names"),
])
def test_a_damaged_meta_json_field_is_one_line_naming_file_and_field(prepared, tmp_path, capsys, edit, words):
    folder = tmp_path / "d"
    shutil.copytree(prepared, folder)
    meta = json.loads((folder / "meta.json").read_text())
    edit(meta)
    (folder / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=f"{folder / 'meta.json'}: .*"):
        TokenData(folder)
    assert main(["train", str(folder), "--out-dir", str(tmp_path / "out"), "--device", "cpu"]) == 2
    line = one_error_line(capsys, "train")
    assert str(folder / "meta.json") in line and words in line


# --- item 17: what prepare refuses, and what it reads once -------------------------------------------


@pytest.mark.parametrize("source, words", [
    ("/dev/zero", "'/dev/zero' is a character device, not a regular file: refused"),
    ("fifo", "is a FIFO (named pipe), not a regular file: refused"),
    ("", "an empty name ('') is not a file or folder"),
    ("dangling", "(a symlink to 'gone.txt', which does not exist)"),
])
def test_prepare_refuses_what_is_not_a_file_or_folder_in_one_line(tmp_path, monkeypatch, capsys, source, words):
    monkeypatch.chdir(tmp_path)
    os.mkfifo("fifo")  # never opened: a read would block forever
    os.symlink("gone.txt", "dangling")
    assert main(["prepare", source, "--out", "d"]) == 2
    assert words in one_error_line(capsys, "prepare")
    assert not (tmp_path / "d").exists()


def test_a_fifo_or_device_link_found_in_a_folder_is_left_out(tmp_path):
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "a.txt").write_text(TEXT)
    os.mkfifo(tmp_path / "texts" / "fifo")
    os.symlink("/dev/zero", tmp_path / "texts" / "zero")
    assert prepare([tmp_path / "texts"], tmp_path / "d")["sources"] == [str(tmp_path / "texts" / "a.txt")]


@pytest.mark.parametrize("out, words", [
    ("", "the output folder's name (--out) is empty"),
    ("a.txt", "output folder 'a.txt' is a file, not a folder"),
])
def test_prepare_refuses_an_empty_or_file_out(tmp_path, monkeypatch, capsys, out, words):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a.txt").write_text(TEXT)
    assert main(["prepare", "a.txt", "--out", out]) == 2
    assert words in one_error_line(capsys, "prepare")
    assert sorted(os.listdir(tmp_path)) == ["a.txt"]


def test_a_file_given_twice_is_read_once_with_one_warning(tmp_path, capsys):
    texts = tmp_path / "texts"
    texts.mkdir()
    (texts / "a.txt").write_text(TEXT)
    (texts / "b.txt").write_text("other text\n" * 5)
    os.symlink(texts / "a.txt", tmp_path / "link.txt")
    os.link(texts / "b.txt", tmp_path / "hard.txt")
    meta = prepare([texts / "a.txt", texts, tmp_path / "link.txt", tmp_path / "hard.txt", texts / "a.txt"],
                   tmp_path / "d")
    assert meta["sources"] == [str(texts / "a.txt"), str(texts / "b.txt")]
    assert meta["num_tokens"] == len(TEXT) + 5 * len("other text\n")
    err = capsys.readouterr().err
    assert err.count("warning") == 1
    assert f"'{texts / 'a.txt'}' is the same file as '{texts / 'a.txt'}' (and 3 more file(s) given twice): " \
           "each file is read once" in err
