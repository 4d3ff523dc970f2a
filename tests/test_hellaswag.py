"""HellaSwag scoring: each ending's summed and mean loss checked against a float64 computation with
transformers' GPT-2, the CLI's one-line errors, and scoring during training (log.jsonl, TensorBoard)."""

import json
import os
import sys
import types

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402

from gptfast.cli import main  # noqa: E402
from gptfast.data import prepare  # noqa: E402
from gptfast.hellaswag import read_examples, score  # noqa: E402
from gptfast.pretrained import from_pretrained  # noqa: E402
from gptfast.tokenizer import TIKTOKEN_FILE_ENV, GPT2Tokenizer  # noqa: E402
from gptfast.train import TrainConfig, train  # noqa: E402

transformers.logging.set_verbosity_error()
needs_ranks = pytest.mark.skipif(not os.environ.get(TIKTOKEN_FILE_ENV),
                                 reason=f"no local GPT-2 ranks file (${TIKTOKEN_FILE_ENV})")
CONTEXT = 24  # the tiny model's context: the long example below is cut to its last 24 tokens

EXAMPLES = [  # HellaSwag's fields (it has more, which are ignored)
    {"ind": 0, "ctx": "A man is sitting on a roof. He", "label": 2, "split": "val",
     "endings": ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.",
                 "is holding a rubik's cube.", "starts pulling up roofing on a roof."]},
    {"ctx": "The cat", "label": 0, "endings": ["sat.", "is on the mat, looking at the birds outside.", "ran", "x"]},
    {"ctx": "Numbers: 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 and then", "label": 3,
     "endings": ["21", "22 23", "a long and winding road", "ok"]},
    {"ctx": "She opened the door and", "label": 1, "endings": ["smiled.", "walked in.", "left it.", "sang!"]},
    {"ctx": "Rain fell all day, so the children", "label": 2,
     "endings": ["played inside.", "went swimming.", "read books quietly.", "flew kites."]},
]


def write_jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A random transformers GPT-2 with GPT-2's vocabulary (a few MB), saved with save_pretrained."""
    folder = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=16, n_positions=CONTEXT, vocab_size=50257,
                                       bos_token_id=None, eos_token_id=None))
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0.0, 1.0 if ".wte" in name or ".wpe" in name else 0.3)
    model.save_pretrained(folder)
    return folder


def reference_losses(hf: GPT2LMHeadModel, tokenizer, record: dict) -> list[tuple[float, float]]:
    """(summed, mean) loss of each " " + ending after the context, in float64, one row at a time."""
    context, out = tokenizer.encode(record["ctx"]), []
    for ending in record["endings"]:
        ending_ids = tokenizer.encode(" " + ending)
        ids = (context + ending_ids)[-CONTEXT:]
        with torch.no_grad():
            logprobs = hf(torch.tensor([ids])).logits[0].double().log_softmax(-1)
        losses = [-logprobs[p - 1, ids[p]].item() for p in range(len(ids) - len(ending_ids), len(ids))]
        out.append((sum(losses), sum(losses) / len(losses)))
    return out


@needs_ranks
def test_scores_match_a_float64_computation_with_transformers(checkpoint, tmp_path, capsys):
    tokenizer = GPT2Tokenizer()
    hf = GPT2LMHeadModel.from_pretrained(checkpoint).double().eval()
    expected = [reference_losses(hf, tokenizer, record) for record in EXAMPLES]
    path = write_jsonl(tmp_path / "hellaswag_val.jsonl", EXAMPLES)
    model = from_pretrained(checkpoint)
    result = score(model, read_examples(path, tokenizer, CONTEXT), batch_size=2)
    for ours, theirs in zip(result.losses, expected):
        torch.testing.assert_close(torch.tensor(ours), torch.tensor(theirs), rtol=1e-4, atol=1e-4)
    acc = sum(min(range(4), key=lambda i: e[i][0]) == r["label"] for e, r in zip(expected, EXAMPLES))
    acc_norm = sum(min(range(4), key=lambda i: e[i][1]) == r["label"] for e, r in zip(expected, EXAMPLES))
    assert (result.examples, result.correct, result.correct_norm) == (5, acc, acc_norm)
    # The CLI prints the same accuracies, batched differently.
    argv = ["eval", "--pretrained", str(checkpoint), "--hellaswag", path, "--dtype", "float32", "--device", "cpu",
            "--batch-size", "3"]
    assert main(argv) == 0
    assert capsys.readouterr().out == (f"{path}: 5 examples: acc {acc / 5:.4f} (summed ending loss), "
                                       f"acc_norm {acc_norm / 5:.4f} (mean ending loss per token)\n")


@pytest.mark.parametrize("line, words", [
    ("{not json", "hellaswag.jsonl:2: not valid JSON"),
    ('{"ctx": "\udcff"}', "hellaswag.jsonl:2: not UTF-8 text (byte 9 of the line)"),  # the byte 0xff
    ("[1, 2]", "hellaswag.jsonl:2: holds a list, expected a JSON object"),
    ('{"ctx": "a", "endings": ["b", "c"]}', "hellaswag.jsonl:2: no 'label' field"),
    ('{"ctx": "a", "endings": ["b", "c"], "label": 2}', "hellaswag.jsonl:2: field 'label' is 2, expected an index"),
    ('{"ctx": "a", "endings": "bc", "label": 0}', "hellaswag.jsonl:2: field 'endings' is bc, expected a list"),
    ('{"ctx": "a", "endings": ["b", "' + "word " * 30 + '"], "label": 0}', "hellaswag.jsonl:2: the context and each"),
])
@needs_ranks
def test_a_bad_line_is_one_error_naming_file_and_line(tmp_path, capsys, checkpoint, line, words):
    path = tmp_path / "hellaswag.jsonl"
    path.write_bytes((json.dumps(EXAMPLES[1]) + "\n" + line + "\n").encode("utf-8", "surrogateescape"))
    argv = ["eval", "--pretrained", str(checkpoint), "--hellaswag", str(path), "--device", "cpu"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"gptfast eval: error: {tmp_path}/{words}") and err.count("\n") == 1, err


@needs_ranks
def test_eval_needs_data_or_hellaswag(checkpoint, capsys):
    assert main(["eval", "--pretrained", str(checkpoint), "--device", "cpu"]) == 2
    assert "nothing to evaluate: name a prepared data folder (DATA), --hellaswag FILE, or both" in \
        capsys.readouterr().err


def test_training_logs_hellaswag_beside_the_validation_loss(tmp_path, monkeypatch):
    """Every --hellaswag-every steps and at the last, into log.jsonl and TensorBoard (a stand-in writer)."""
    scalars = []

    class SummaryWriter:
        def __init__(self, log_dir, purge_step=None):
            pass

        def add_scalar(self, tag, value, step):
            scalars.append((tag, step))

        def close(self):
            pass

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=SummaryWriter))
    prepare(None, tmp_path / "data")
    records = [{"ctx": "The function returns", "endings": ["a list.", "the value", "None", "an obj"], "label": 1}] * 3
    cfg = TrainConfig(data=[str(tmp_path / "data")], out_dir=str(tmp_path / "run"), preset="tiny", context_length=32,
                      batch_size=2, max_steps=5, eval_interval=5, eval_batches=1, sample_tokens=0, progress=False,
                      backend="torch", device="cpu", tensorboard=True, hellaswag_every=2,
                      hellaswag=write_jsonl(tmp_path / "h.jsonl", records))
    train(cfg)
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    scored = [r for r in log if "hellaswag_acc" in r]
    assert [r["step"] for r in scored] == [2, 4, 5]
    assert all(r["hellaswag_acc"] in (0.0, 1.0) and r["hellaswag_acc_norm"] in (0.0, 1.0) for r in scored)
    assert ("hellaswag_acc_norm", 4) in scalars and ("val_loss", 5) in scalars
    with pytest.raises(ValueError, match="hellaswag_every=2 needs hellaswag"):
        train(TrainConfig(data=[str(tmp_path / "data")], out_dir=str(tmp_path / "b"), hellaswag_every=2,
                          backend="torch", device="cpu"))


@needs_ranks
def test_a_missing_hellaswag_file_is_one_line_naming_the_option(checkpoint, tmp_path, capsys):
    missing = tmp_path / "nowhere.jsonl"
    assert main(["eval", "--pretrained", str(checkpoint), "--hellaswag", str(missing), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err == f"gptfast eval: error: the HellaSwag file (--hellaswag) '{missing}' cannot be read: " \
                  "No such file or directory\n"
