"""What is refused before a model is built or trained, in one line: a model configuration with a bad value
or a size no memory holds (from a checkpoint, on every route), and a batch whose training cannot fit
(gptfast.memory's estimate against the memory available)."""

import math

import pytest
import torch

import gptfast.setup_run as setup_run
from gptfast import GPT, GPTConfig
from gptfast.checkpoint import load_for_inference, model_config_from, save_checkpoint
from gptfast.cli import main
from gptfast.config import TrainConfig
from gptfast.data import prepare
from gptfast.memory import parameter_count, training_estimate
from gptfast.tokenizer import CharTokenizer

TOKENIZER = CharTokenizer("abcdefgh\n")
CONFIG = GPTConfig(vocab_size=TOKENIZER.vocab_size, n_layer=1, n_head=2, n_embd=16, context_length=8)


def one_error_line(capsys, command: str) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith(f"gptfast {command}: error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("edit, words", [
    (dict(layer_norm_eps=-1.0), "field 'layer_norm_eps' is -1.0, expected a positive finite number"),
    (dict(layer_norm_eps=0.0), "field 'layer_norm_eps' is 0.0, expected a positive finite number"),
    (dict(layer_norm_eps=math.nan), "field 'layer_norm_eps' is nan, expected a positive finite number"),
    (dict(layer_norm_eps=math.inf), "field 'layer_norm_eps' is inf, expected a positive finite number"),
    (dict(n_layer=10**6, n_embd=768, n_head=12), "1000000 layers has"),  # hung generate, resume and init_from
    (dict(n_layer=10**9), "1000000000 layers has"),
])
def test_a_checkpoint_with_a_bad_or_huge_model_config_is_one_line(tmp_path, capsys, edit, words):
    state = {"model": GPT(CONFIG).state_dict(), "model_config": {**CONFIG.to_dict(), **edit},
             "tokenizer": TOKENIZER.to_dict()}
    path = save_checkpoint(tmp_path, state)
    with pytest.raises(ValueError, match=words):  # what a resumed run reads the configuration with
        model_config_from(state["model_config"], f"{path}: field 'model_config'")
    with pytest.raises(ValueError, match=words):  # generate, eval and init_from
        load_for_inference(tmp_path)
    assert main(["generate", "--checkpoint", str(tmp_path), "-n", "1", "--device", "cpu"]) == 2
    line = one_error_line(capsys, "generate")
    assert f"{path}: field 'model_config': " in line and words in line, line


def test_the_training_estimate_by_parts():
    config = GPTConfig.from_preset("tiny", vocab_size=65)
    n = parameter_count(config)
    estimate = training_estimate(config, 8, None)
    assert (estimate.gradients, estimate.optimizer) == (4 * n, 8 * n) and estimate.parameters > 4 * n
    assert training_estimate(config, 16, None).activations == 2 * estimate.activations
    assert training_estimate(config, 8, torch.bfloat16).activations * 2 == estimate.activations
    unfused = training_estimate(GPTConfig.from_preset("tiny", vocab_size=65, fused_lm_head=False), 8, None)
    assert unfused.activations == estimate.activations + 2 * 8 * 128 * 65 * 4  # the logits and their gradient
    assert estimate.total == sum((estimate.parameters, estimate.gradients, estimate.optimizer, estimate.activations))


def test_training_that_does_not_fit_the_free_memory_is_refused_with_both_sizes(monkeypatch):
    cfg = TrainConfig(batch_size=4)
    estimate = training_estimate(CONFIG, 4, None)
    cpu = torch.device("cpu")
    monkeypatch.setattr(setup_run, "available_bytes", lambda device: estimate.total)
    setup_run.check_memory(cfg, CONFIG, cpu)
    # a source model already on the CPU: its weights count as available
    monkeypatch.setattr(setup_run, "available_bytes", lambda device: estimate.total - estimate.parameters)
    setup_run.check_memory(cfg, CONFIG, cpu, already_allocated=estimate.parameters)
    monkeypatch.setattr(setup_run, "available_bytes", lambda device: estimate.total - 1)
    with pytest.raises(ValueError, match=r"^batch_size=4: training needs about .* MB on cpu \(parameters .*, "
                                         r"activations .* for 4 x 8 tokens\), but .* MB is available: lower "
                                         r"batch_size or context_length"):
        setup_run.check_memory(cfg, CONFIG, cpu)
    monkeypatch.setattr(setup_run, "available_bytes", lambda device: None)  # not known: no check
    setup_run.check_memory(cfg, CONFIG, cpu)


def test_an_absurd_batch_is_refused_before_the_first_step_allocates_it(tmp_path, capsys):
    data = tmp_path / "data"
    prepare(None, data)
    argv = ["train", str(data), "--out-dir", str(tmp_path / "out"), "--context-length", "32", "--batch-size",
            "10000000", "--max-steps", "1", "--sample-tokens", "0", "--no-progress", "--backend", "torch",
            "--device", "cpu"]
    assert main(argv) == 2
    line = one_error_line(capsys, "train")
    assert "--batch-size 10000000: training needs about" in line and "x 32 tokens), but" in line, line
    assert "lower --batch-size or --context-length" in line
