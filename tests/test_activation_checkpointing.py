"""Activation checkpointing (issue 27, item 3): the same gradients with and without it, dropout on,
on the eager and the Triton backend (the interpreter on a CPU); the state dict's keys unchanged; a
training run's losses unchanged; less kept memory in the order none > selective > full."""

import functools
import json

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from gptfast import GPT, GPTConfig, kernels
from gptfast.activation_checkpointing import MODES, apply_activation_checkpointing
from gptfast.data import prepare
from gptfast.runlog import LOG_FILE
from gptfast.train import TrainConfig, train

# One block is enough to recompute; small enough that the Triton interpreter takes seconds.
CONFIG = GPTConfig(vocab_size=40, n_layer=1, n_embd=32, n_head=2, context_length=16, drop_rate=0.2)


def gradients(mode: str, backend: str, *, wrap=None) -> dict[str, torch.Tensor]:
    """The gradients of one training forward and backward, dropout on, the model wrapped for ``mode``."""
    torch.manual_seed(0)
    model = GPT(CONFIG)
    apply_activation_checkpointing(model, mode)
    if wrap is not None:
        wrap(model)
    idx, targets = torch.randint(0, CONFIG.vocab_size, (2, 1, CONFIG.context_length),
                                 generator=torch.Generator().manual_seed(1))
    torch.manual_seed(2)  # dropout's numbers
    with kernels.use_backend(backend):
        _, loss = model(idx, targets)
        loss.backward()
    return {name: p.grad for name, p in model.named_parameters()}


@pytest.fixture(scope="module", params=["torch", "triton"])
def backend(request):
    if request.param == "triton" and not kernels.backend.HAS_TRITON:
        pytest.skip("Triton is not installed")
    return request.param


@pytest.fixture(scope="module")
def reference(backend):
    return gradients("none", backend)


def unwrapped(name: str) -> str:
    return name.replace("._checkpoint_wrapped_module", "")


@pytest.mark.parametrize("mode", ["selective", "full"])
def test_gradients_are_bit_equal_with_dropout(backend, reference, mode):
    grads = {unwrapped(name): g for name, g in gradients(mode, backend).items()}
    assert grads.keys() == reference.keys()
    unequal = [name for name, g in grads.items() if not torch.equal(g, reference[name])]
    assert not unequal, f"{mode} on {backend}: gradients differ for {unequal}"


def test_an_unreplayed_generator_would_be_caught(backend, reference):
    """The control: recomputing each block without restoring the generator draws other dropout (the
    attention kernel's seed included) and gives other gradients, which the test above would see."""
    def forget_rng(model):
        for block in model.transformer.h:
            block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False,
                                              preserve_rng_state=False)
    grads = gradients("none", backend, wrap=forget_rng)
    assert not torch.equal(grads["transformer.h.0.attn.c_attn.weight"], reference["transformer.h.0.attn.c_attn.weight"])


def test_wrapping_keeps_the_state_dict_and_the_output():
    torch.manual_seed(0)
    plain = GPT(CONFIG).eval()
    wrapped = GPT(CONFIG).eval()
    wrapped.load_state_dict(plain.state_dict())
    apply_activation_checkpointing(wrapped, "selective")
    assert list(wrapped.state_dict()) == list(plain.state_dict())
    wrapped.load_state_dict(plain.state_dict())  # and loads the unwrapped keys
    idx = torch.randint(0, CONFIG.vocab_size, (2, CONFIG.context_length))
    with torch.no_grad():
        assert torch.equal(wrapped(idx)[0], plain(idx)[0])
    assert torch.equal(wrapped.generate(idx[:, :4], 5, temperature=0.0), plain.generate(idx[:, :4], 5, temperature=0.0))


def test_bad_mode_and_second_wrap_are_refused():
    model = GPT(CONFIG)
    with pytest.raises(ValueError, match="unknown activation checkpointing mode 'some': choose one of none, selective"):
        apply_activation_checkpointing(model, "some")
    apply_activation_checkpointing(model, "full")
    with pytest.raises(ValueError, match="applied to this model already"):
        apply_activation_checkpointing(model, "selective")
    assert MODES == ("none", "selective", "full")


def test_training_losses_are_unchanged_and_the_option_is_checked(tmp_path, capsys):
    data = tmp_path / "data"
    prepare(None, data)
    losses = {}
    for mode in ("none", "full"):
        out = tmp_path / mode
        train(TrainConfig(data=[str(data)], out_dir=str(out), preset="tiny", context_length=8, batch_size=2,
                          max_steps=3, warmup_steps=1, eval_interval=3, eval_batches=1, log_interval=1,
                          dropout=0.1, sample_tokens=0, progress=False, backend="torch", device="cpu",
                          activation_checkpointing=mode))
        banner = capsys.readouterr().out
        assert "memory per process (estimate): parameters" in banner and f"(activation checkpointing {mode})" in banner
        losses[mode] = [r["loss"] for r in map(json.loads, (out / LOG_FILE).read_text().splitlines()) if "loss" in r]
    assert len(losses["none"]) == 3 and losses["full"] == losses["none"]
    with pytest.raises(ValueError, match="unknown activation_checkpointing 'half'"):
        TrainConfig(activation_checkpointing="half")


def test_the_gpu_runs_report_compares_each_mode_with_none():
    """The report's table of the GPU run's train-ac stage: tokens/s and peak memory against "triton" (none)."""
    from gptfast.bench import end_to_end, report
    from gptfast.bench.harness import UNAVAILABLE, Record

    size = end_to_end.AC_SIZES["full"][1].as_dict()
    records = [Record(end_to_end.AC_GROUP, provider, "step", size, value=value, unit="tokens/s", peak_mb=peak)
               for provider, value, peak in zip(end_to_end.AC_PROVIDERS, (1000.0, 900.0), (40960.0, 30720.0))]
    records.append(Record(end_to_end.AC_GROUP, "triton/ac-full", "step", size, status=UNAVAILABLE, note="skipped"))
    table = report._against_default_table(records, end_to_end.AC_GROUP, "Activation checkpointing", "none")
    assert table[0] == "## Activation checkpointing"
    assert "| gpt2-xl | 8 x 1024 | triton/ac-selective | 900 | 0.90x | 30.0 GiB | 0.75x |" in table
    assert "| gpt2-xl | 8 x 1024 | triton/ac-full | n/a |  |  |  |" in table
