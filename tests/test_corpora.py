"""Corpora people have: JSONL (plain, gzip, zstandard), Parquet and Arrow records; parallel preparation
(the same bytes for any number of workers, memory bounded, an interrupted run leaves nothing that looks
prepared); llm.c's .bin shards read and written."""

import gzip
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
import tracemalloc

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import zstandard

import gptfast.data as data
import gptfast.encoding as encoding
from gptfast.cli import main
from gptfast.data import TokenData, prepare
from gptfast.tokenizer import TIKTOKEN_FILE_ENV

DOCS = ["First document.\nWith two lines.", "Second: naïve café, 東京 🙂", "third", "Fourth and last document\n"]
RECORDS = [{"id": i, "text": text} for i, text in enumerate(DOCS)]


def one_error_line(capsys, command: str = "prepare") -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"gptfast {command}: error: "), err
    return err


def write_jsonl(path, records, opener=open) -> str:
    with opener(path, "wb") as f:
        f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8"))
    return str(path)


def write_zst(path, records) -> str:
    raw = "".join(json.dumps(r) + "\n" for r in records).encode("utf-8")
    path.write_bytes(zstandard.ZstdCompressor().compress(raw))
    return str(path)


def write_parquet(path, records, row_group_size=2) -> str:
    pq.write_table(pa.Table.from_pylist(records), path, row_group_size=row_group_size)
    return str(path)


def write_arrow_stream(path, records) -> str:
    table = pa.Table.from_pylist(records)
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table, max_chunksize=3)
    return str(path)


def tokens(folder) -> np.ndarray:
    d = TokenData(folder)
    return np.concatenate([d.train, d.val])


@pytest.mark.parametrize("kind", ["jsonl", "jsonl.gz", "jsonl.zst", "parquet", "arrow"])
def test_each_record_format_gives_the_same_documents(tmp_path, kind):
    path = tmp_path / f"corpus.{kind}"
    {"jsonl": lambda: write_jsonl(path, RECORDS), "jsonl.gz": lambda: write_jsonl(path, RECORDS, gzip.open),
     "jsonl.zst": lambda: write_zst(path, RECORDS), "parquet": lambda: write_parquet(path, RECORDS),
     "arrow": lambda: write_arrow_stream(path, RECORDS)}[kind]()
    meta = prepare([path], tmp_path / "out", val_fraction=0.2)
    assert TokenData(tmp_path / "out").tokenizer().decode(tokens(tmp_path / "out").tolist()) == "".join(DOCS)
    assert meta["sources"] == [str(path)]


def test_a_datasets_folder_reads_its_arrow_files_only(tmp_path):
    folder = tmp_path / "saved"
    folder.mkdir()
    write_arrow_stream(folder / "data-00000-of-00002.arrow", RECORDS[:2])
    write_arrow_stream(folder / "data-00001-of-00002.arrow", RECORDS[2:])
    (folder / "dataset_info.json").write_text('{"features": {}}')
    (folder / "state.json").write_text('{"_data_files": []}')
    meta = prepare([folder], tmp_path / "out")
    assert len(meta["sources"]) == 2
    assert TokenData(tmp_path / "out").tokenizer().decode(tokens(tmp_path / "out").tolist()) == "".join(DOCS)


@pytest.mark.skipif(not os.environ.get(TIKTOKEN_FILE_ENV), reason=f"no local GPT-2 ranks file (${TIKTOKEN_FILE_ENV})")
def test_gpt2_separates_records_with_endoftext_and_reads_another_field(tmp_path):
    records = [{"content": text} for text in DOCS]
    prepare([write_jsonl(tmp_path / "a.jsonl", records)], tmp_path / "out", tokenizer="gpt2", text_field="content")
    tok = TokenData(tmp_path / "out").tokenizer()
    assert tok.decode(tokens(tmp_path / "out").tolist()) == "<|endoftext|>".join(DOCS)


BAD_LINES = ['{"text": "good one"}', "{not json", '{"txt": "no field"}', '{"text": 7}', "[1]", "", '{"text": "ok"}']


def test_bad_records_are_skipped_and_counted_or_refused_with_strict(tmp_path, capsys):
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(BAD_LINES) + "\n")
    assert main(["prepare", str(path), "--out", str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err
    assert f"skipped 4 bad record(s) (--strict refuses them); the first: {path}:2: not valid JSON" in err
    assert TokenData(tmp_path / "out").tokenizer().decode(tokens(tmp_path / "out").tolist()) == "good oneok"
    assert main(["prepare", str(path), "--out", str(tmp_path / "strict"), "--strict"]) == 2
    assert f"{path}:2: not valid JSON (column 2: Expecting property name" in one_error_line(capsys)
    table = [{"text": "fine"}, {"text": None}]
    write_parquet(tmp_path / "nulls.parquet", table)
    assert main(["prepare", str(tmp_path / "nulls.parquet"), "--out", str(tmp_path / "p"), "--strict"]) == 2
    assert f"{tmp_path / 'nulls.parquet'}: record 2: field 'text' is NoneType, not a string" in one_error_line(capsys)
    (tmp_path / "all_bad.jsonl").write_text('{"x": 1}\n')
    assert main(["prepare", str(tmp_path / "all_bad.jsonl"), "--out", str(tmp_path / "b")]) == 2
    assert "every record of" in one_error_line(capsys) and not (tmp_path / "b" / "meta.json").exists()


def test_format_errors_are_one_line_naming_the_file(tmp_path, capsys, monkeypatch):
    write_parquet(tmp_path / "c.parquet", [{"body": "x"}])
    assert main(["prepare", str(tmp_path / "c.parquet"), "--out", str(tmp_path / "o")]) == 2
    assert f"{tmp_path / 'c.parquet'}: no 'text' column (it has body): choose the text with --text-field" in \
        one_error_line(capsys)
    damaged = gzip.compress(("\n".join(json.dumps({"text": "w" * 50}) for _ in range(200))).encode())
    (tmp_path / "d.jsonl.gz").write_bytes(damaged[: len(damaged) // 2])
    assert main(["prepare", str(tmp_path / "d.jsonl.gz"), "--out", str(tmp_path / "o")]) == 2
    assert f"{tmp_path / 'd.jsonl.gz'}: cannot decompress after line" in one_error_line(capsys)
    cut = zstandard.ZstdCompressor().compress(("\n".join(json.dumps({"text": f"w{i}"}) for i in range(900))).encode())
    (tmp_path / "d.jsonl.zst").write_bytes(cut[: len(cut) // 2])  # zstandard's own reader stops there silently
    assert main(["prepare", str(tmp_path / "d.jsonl.zst"), "--out", str(tmp_path / "o")]) == 2
    assert f"{tmp_path / 'd.jsonl.zst'}: cannot decompress after line" in one_error_line(capsys)
    (tmp_path / "e.parquet").write_bytes(b"PAR1 not really")
    assert main(["prepare", str(tmp_path / "e.parquet"), "--out", str(tmp_path / "o")]) == 2
    assert f"{tmp_path / 'e.parquet'}: not a readable parquet file" in one_error_line(capsys)
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # as if the extra were not installed
    assert main(["prepare", str(tmp_path / "c.parquet"), "--out", str(tmp_path / "o")]) == 2
    assert "reading .parquet files needs pyarrow: pip install 'gptfast-triton[data]'" in one_error_line(capsys)


@pytest.fixture(scope="module")
def mixed_corpus(tmp_path_factory):
    """Text files (one not text, found only after some blocks), JSONL and Parquet: about 300 KB."""
    folder = tmp_path_factory.mktemp("mixed")
    topics = data.default_corpus()[:200_000]
    (folder / "a.txt").write_text(topics[:90_000])
    (folder / "b_binary.txt").write_bytes(topics[:30_000].encode() + b"\0 binary tail")
    write_jsonl(folder / "c.jsonl", [{"text": topics[i: i + 700]} for i in range(90_000, 160_000, 700)])
    write_parquet(folder / "d.parquet", [{"text": topics[i: i + 900]} for i in range(160_000, 200_000, 900)], 10)
    return folder


def test_the_output_is_the_same_bytes_for_any_number_of_workers(mixed_corpus, tmp_path, monkeypatch):
    monkeypatch.setattr(data, "BLOCK_BYTES", 4096)  # many jobs
    outputs = []
    for workers in (1, 2, 3):
        prepare([mixed_corpus], tmp_path / str(workers), workers=workers)
        outputs.append((tmp_path / str(workers) / "tokens.bin").read_bytes())
    assert outputs[0] == outputs[1] == outputs[2] and len(outputs[0]) > 300_000
    meta = json.loads((tmp_path / "2" / "meta.json").read_text())
    assert [os.path.basename(s) for s in meta["sources"]] == ["a.txt", "c.jsonl", "d.parquet"]


def test_memory_stays_bounded_whatever_the_input_size(tmp_path, monkeypatch):
    """More text than the cap goes through while at most JOBS_PER_WORKER jobs per worker are held (a job
    being under two blocks and a line)."""
    monkeypatch.setattr(data, "BLOCK_BYTES", 8192)
    encoders = []
    monkeypatch.setattr(data, "OrderedEncoder",
                        lambda *args: encoders.append(encoding.OrderedEncoder(*args)) or encoders[-1])
    line = "a line of text that repeats, the corpus many times larger than the cap\n"
    (tmp_path / "big.txt").write_text(line * 30_000)  # 2.2 MB, 30 times the cap
    cap = encoding.JOBS_PER_WORKER * 2 * 2 * (8192 + len(line))
    tracemalloc.start()
    try:
        prepare([tmp_path / "big.txt"], tmp_path / "out", workers=2)
        peak = tracemalloc.get_traced_memory()[1]  # this process's Python and numpy allocations
    finally:
        tracemalloc.stop()
    assert 0 < encoders[-1].peak_pending_chars <= cap and (tmp_path / "big.txt").stat().st_size > 20 * cap
    assert peak < 1 << 20  # under half the text, however long it is (about 0.4 MB measured, for 2.2 MB)


def test_ctrl_c_during_a_parallel_prepare_keeps_the_old_data_and_stops_the_workers(tmp_path, monkeypatch):
    (tmp_path / "a.txt").write_text("first text\n" * 50)
    prepare([tmp_path / "a.txt"], tmp_path / "out")
    before = (tmp_path / "out" / "tokens.bin").read_bytes()
    (tmp_path / "a.txt").write_text("other words on many lines\n" * 5000)
    monkeypatch.setattr(data, "BLOCK_BYTES", 4096)
    write = data._write_tokens

    def interrupted(f, results, *args):
        return write(f, (r if i < 5 else (_ for _ in ()).throw(KeyboardInterrupt()) for i, r in enumerate(results)),
                     *args)

    monkeypatch.setattr(data, "_write_tokens", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare([tmp_path / "a.txt"], tmp_path / "out", workers=2)
    assert (tmp_path / "out" / "tokens.bin").read_bytes() == before and TokenData(tmp_path / "out").meta
    assert not (tmp_path / "out" / "tokens.bin.tmp").exists() and not multiprocessing.active_children()


def children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (from /proc: Linux)."""
    found = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as f:
                if entry.isdigit() and int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry))
        except (OSError, ValueError, IndexError):
            continue
    return found


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="finds the workers in /proc")
def test_kill_9_during_a_parallel_prepare_leaves_no_prepared_folder(tmp_path):
    (tmp_path / "big.txt").write_text("words and more words on a line\n" * 250_000)  # 8 MB
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    process = subprocess.Popen([sys.executable, "-m", "gptfast", "prepare", str(tmp_path / "big.txt"), "--out",
                                str(tmp_path / "out"), "--workers", "2"], env=env, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not (tmp_path / "out" / "tokens.bin.tmp").exists() and time.time() < deadline:
        time.sleep(0.005)
    workers = []
    while not workers and time.time() < deadline:
        workers = children(process.pid)
    process.kill()
    _, err = process.communicate(timeout=60)
    assert process.returncode == -signal.SIGKILL, err.decode()
    deadline = time.time() + 10
    while any(os.path.exists(f"/proc/{pid}") for pid in workers) and time.time() < deadline:
        time.sleep(0.05)
    assert workers and not any(os.path.exists(f"/proc/{pid}") for pid in workers), "a worker outlived its main"
    assert not (tmp_path / "out" / "meta.json").exists() and not (tmp_path / "out" / "tokens.bin").exists()
    with pytest.raises(FileNotFoundError, match="not a prepared data folder"):
        TokenData(tmp_path / "out")


# --- llm.c shards ----------------------------------------------------------------------------------


def llmc_shard(path, tokens, magic=20240520, version=1) -> None:
    """A shard in llm.c's layout, written here by hand: 256 int32 (magic, version, count), uint16 tokens."""
    header = np.zeros(256, dtype="<i4")
    header[:3] = magic, version, len(tokens)
    path.write_bytes(header.tobytes() + np.asarray(tokens, dtype="<u2").tobytes())


def read_llmc(path) -> np.ndarray:
    header = np.fromfile(path, dtype="<i4", count=256)
    assert header[0] == 20240520 and header[1] == 1
    tokens = np.fromfile(path, dtype="<u2", offset=1024)
    assert len(tokens) == header[2]
    return tokens


@pytest.fixture
def llmc_folder(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "fineweb10B"
    folder.mkdir()
    val, train = rng.integers(0, 50257, 3000), [rng.integers(0, 50257, 5000), rng.integers(0, 50257, 4000)]
    llmc_shard(folder / "fineweb_val_000000.bin", val)
    llmc_shard(folder / "fineweb_train_000001.bin", train[0])
    llmc_shard(folder / "fineweb_train_000002.bin", train[1])
    return folder, val, np.concatenate(train)


def test_a_folder_of_llmc_shards_is_read_in_place(llmc_folder):
    folder, val, train = llmc_folder
    d = TokenData(folder)
    assert (len(d.train), len(d.val)) == (9000, 3000) and d.meta["tokenizer"] == {"kind": "gpt2"}
    assert (d.train[4990:5010] == train[4990:5010]).all() and (d.val[0:3000] == val).all()  # across two shards
    stream = data.BatchStream(d.train, 64, order="sequential")
    x, y = stream.batch(torch.tensor([4950, 0]))
    assert (x[0].numpy() == train[4950:5014]).all() and (y[0].numpy() == train[4951:5015]).all()
    assert d.meta["sources"] == ["fineweb_train_000001.bin", "fineweb_train_000002.bin", "fineweb_val_000000.bin"]


@pytest.mark.parametrize("damage, words", [
    (lambda p: p.write_bytes(p.read_bytes()[:-7]), "truncated: the header (byte offset 8) counts 4,000 tokens, "
     "9,024 bytes in all, but the file ends at byte offset 9,017"),
    (lambda p: llmc_shard(p, [5, 50257, 7]), "token id 50257 at byte offset 1026 (token 1) is outside GPT-2's"),
    (lambda p: llmc_shard(p, [5], version=2), "byte offset 4: version 2; only version 1"),
    (lambda p: p.write_bytes(p.read_bytes()[:100]), "truncated at byte offset 100"),
    (lambda p: p.write_bytes(b"\0" * 4 + p.read_bytes()[4:]), "byte offset 0: magic number 0, expected 20240520"),
    (lambda p: p.write_bytes(p.read_bytes()[:2]), "truncated at byte offset 2"),
])
def test_a_damaged_shard_is_one_line_naming_file_and_offset(llmc_folder, tmp_path, capsys, damage, words):
    folder = llmc_folder[0]
    damage(folder / "fineweb_train_000002.bin")
    argv = ["train", str(folder), "--out-dir", str(tmp_path / "run"), "--device", "cpu"]
    assert main(argv) == 2
    err = one_error_line(capsys, "train")
    assert f"{folder / 'fineweb_train_000002.bin'}: " in err and words in err
    with pytest.raises(ValueError, match=words.replace("(", r"\(").replace(")", r"\)")):
        TokenData(folder)


@pytest.mark.skipif(not os.environ.get(TIKTOKEN_FILE_ENV), reason="llm.c shards are GPT-2 tokens: needs the ranks file")
def test_training_on_llmc_shards_resumes_exactly(llmc_folder, tmp_path):
    base = dict(data=[str(llmc_folder[0])], preset="tiny", context_length=16, batch_size=2, max_steps=2,
                eval_interval=2, eval_batches=1, sample_tokens=0, progress=False, backend="torch", device="cpu")
    from gptfast.train import TrainConfig, train

    straight = train(TrainConfig(out_dir=str(tmp_path / "a"), **base))
    train(TrainConfig(out_dir=str(tmp_path / "b"), run_steps=1, **base))
    resumed = train(TrainConfig(out_dir=str(tmp_path / "b"), resume=True, **base))
    assert (resumed["step"], resumed["loss"], resumed["val_loss"]) == (2, straight["loss"], straight["val_loss"])


@pytest.mark.skipif(not os.environ.get(TIKTOKEN_FILE_ENV), reason=f"no local GPT-2 ranks file (${TIKTOKEN_FILE_ENV})")
def test_prepare_writes_llmc_shards_that_hold_the_same_tokens(tmp_path, capsys, monkeypatch):
    text = tmp_path / "a.txt"
    text.write_text(data.default_corpus()[:20_000])
    prepare([text], tmp_path / "ours", tokenizer="gpt2")
    ours = TokenData(tmp_path / "ours")
    argv = ["prepare", str(text), "--out", str(tmp_path / "llmc"), "--tokenizer", "gpt2", "--format", "llmc",
            "--shard-tokens", "1000"]
    assert main(argv) == 0
    names = sorted(os.listdir(tmp_path / "llmc"))
    assert names[0] == "data_train_000001.bin" and names[-1] == "data_val_000000.bin"
    shards = {name: read_llmc(tmp_path / "llmc" / name) for name in names}
    assert max(len(t) for t in shards.values()) == 1000
    assert (np.concatenate([shards[n] for n in names[:-1]]) == ours.train).all()
    assert (shards[names[-1]] == ours.val).all()
    theirs = TokenData(tmp_path / "llmc")  # and back: read as llm.c's
    assert (theirs.train[0:len(ours.train)] == ours.train).all() and (theirs.val[0:len(ours.val)] == ours.val).all()
    assert theirs.meta["num_tokens"] == ours.meta["num_tokens"]
    capsys.readouterr()
    assert main(argv) == 2  # a folder of shards is never overwritten
    assert "is not empty: llm.c shards go into a new or empty folder" in one_error_line(capsys)
    assert main(["prepare", str(tmp_path / "llmc"), "--out", str(tmp_path / "again")]) == 2
    assert "holds llm.c shards (token ids), not text: train on it as it is" in one_error_line(capsys)
    assert main(["prepare", str(text), "--out", str(tmp_path / "t"), "--shard-tokens", "1000"]) == 2
    assert "--shard-tokens applies to --format llmc only (this is --format tokens)" in one_error_line(capsys)
    (tmp_path / "empty").mkdir()
    monkeypatch.chdir(tmp_path / "empty")
    assert main(["prepare", str(text), "--out", ".", "--tokenizer", "gpt2", "--format", "llmc"]) == 2
    assert "output folder '.' is the current folder: llm.c shards go into a new or empty folder of their own" \
        in one_error_line(capsys)

    def interrupted(tokens, num_val, folder, shard_tokens):
        llmc_shard(folder / "data_val_000000.bin", tokens[:5])
        raise KeyboardInterrupt

    monkeypatch.setattr(data, "write_shards", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare([text], tmp_path / "new", tokenizer="gpt2", format="llmc")
    assert not (tmp_path / "new").exists() and not (tmp_path / ".new.partial").exists()


@pytest.mark.skipif(not os.environ.get(TIKTOKEN_FILE_ENV), reason=f"no local GPT-2 ranks file (${TIKTOKEN_FILE_ENV})")
def test_eval_reads_llmc_shards_and_prepare_writes_them_from_gpt2_tokens_only(llmc_folder, tmp_path, capsys):
    pytest.importorskip("safetensors")
    from gptfast import GPT, GPTConfig

    GPT(GPTConfig(n_layer=1, n_head=1, n_embd=8, context_length=32, vocab_size=50257)).save_pretrained(tmp_path / "hf")
    argv = ["eval", str(llmc_folder[0]), "--pretrained", str(tmp_path / "hf"), "--device", "cpu", "--max-windows", "3"]
    assert main(argv) == 0
    assert f"val split of {llmc_folder[0]}: 96 tokens in windows of 32: loss " in capsys.readouterr().out
    (tmp_path / "a.txt").write_text("some text\n")
    assert main(["prepare", str(tmp_path / "a.txt"), "--out", str(tmp_path / "o"), "--format", "llmc"]) == 2
    assert "llm.c shards hold GPT-2 tokens: prepare them with --tokenizer gpt2" in one_error_line(capsys)


def test_absurd_counts_and_an_empty_text_field_are_refused(tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("some text\n")
    with pytest.raises(SystemExit, match="2"):  # a pool forks all its processes at once
        main(["prepare", str(text), "--out", str(tmp_path / "o"), "--workers", "100000"])
    assert "argument --workers: must be from 1 to 512, got 100000" in capsys.readouterr().err
    argv = ["prepare", str(text), "--out", str(tmp_path / "s"), "--tokenizer", "gpt2", "--format", "llmc"]
    assert main([*argv, "--shard-tokens", str(2**31)]) == 2  # the shard header counts tokens in an int32
    assert "--shard-tokens must be from 1 to 2,147,483,647" in one_error_line(capsys)
    assert not (tmp_path / "o").exists() and not (tmp_path / "s").exists()
    (tmp_path / "r.jsonl").write_text('{"text": "x"}\n')  # an empty --text-field is that name, not the default
    assert main(["prepare", str(tmp_path / "r.jsonl"), "--out", str(tmp_path / "o"), "--text-field", ""]) == 2
    assert "r.jsonl:1: no '' field" in one_error_line(capsys)
