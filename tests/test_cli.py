"""The command line's own surface: --version, the help texts, --backend on either side of the command, info."""

import argparse

import pytest

import gptfast
from gptfast import GPT, GPTConfig, kernels
from gptfast.cli import build_parser, main


def commands() -> dict[str, argparse.ArgumentParser]:
    """The registered subcommands, read from the parser (so a new command is checked too)."""
    parser = build_parser()
    return next(action.choices for action in parser._actions if isinstance(action, argparse._SubParsersAction))


def test_version(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["--version"])
    assert exit.value.code == 0
    assert capsys.readouterr().out.strip() == f"gptfast {gptfast.__version__} (distribution gptfast-triton)"


def test_top_level_help_lists_every_command_without_rst_markup():
    text = build_parser().format_help()
    registered = commands()
    assert {"prepare", "train", "generate", "eval", "info", "bench"} <= set(registered)
    for name in registered:
        assert f"\n    {name} " in text, f"{name} is not listed in gptfast --help"
    for name, command in registered.items():
        assert "``" not in command.format_help(), f"gptfast {name} --help shows RST markup"
    assert "``" not in text


def test_every_command_that_reads_options_takes_backend_after_it():
    for name, command in commands().items():
        if "-" in command.prefix_chars:  # not bench, which hands every argument to its own parser
            assert "--backend" in command._option_string_actions, f"gptfast {name} --backend is refused"


@pytest.mark.parametrize("name", ["prepare", "train", "generate", "eval", "info"])
def test_command_help_has_a_description(name):
    assert commands()[name].description, f"gptfast {name} --help has no description"


@pytest.mark.parametrize("argv", [["info"], ["prepare", "--out", "x"], ["generate", "--checkpoint", "x"],
                                  ["eval", "data", "--checkpoint", "x"], ["train"]])
def test_backend_before_or_after_the_command(argv):
    parser = build_parser()
    assert parser.parse_args(argv + ["--backend", "torch"]).backend == "torch"
    assert parser.parse_args(["--backend", "triton"] + argv).backend == "triton"
    assert parser.parse_args(argv).backend is None


def test_backend_after_the_command_is_applied(capsys):
    previous = kernels.get_backend()
    try:
        assert main(["info", "--backend", "torch"]) == 0
    finally:
        kernels.set_backend(previous)
    assert "backend: torch;" in capsys.readouterr().out


def tiny_parameters(vocab_size: int) -> str:
    return f"{GPT(GPTConfig.from_preset('tiny', vocab_size=vocab_size)).num_parameters():,}"


def test_info_counts_parameters_for_the_vocabulary_it_names(capsys):
    assert main(["info", "--vocab-size", "100"]) == 0
    out = capsys.readouterr().out
    assert "parameters for a vocabulary of 100 tokens" in out
    tiny = next(line for line in out.splitlines() if line.startswith("tiny "))
    assert tiny.split()[5] == tiny_parameters(100) == "822,528"  # the README's 0.8M char-level tiny
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "parameters for GPT-2's vocabulary of 50,257 tokens" in out and "--vocab-size 100" in out
    assert "gpt2-medium " in out.split("training memory per GPU (estimate): 1 GPU(s), ddp")[1]  # every preset
    tiny = next(line for line in out.splitlines() if line.startswith("tiny "))
    assert tiny.split()[5] == tiny_parameters(50257)


@pytest.mark.parametrize(("text", "shown"), [("0", "0"), ("1e10", "'1e10'")])
def test_info_refuses_a_vocabulary_that_is_not_a_positive_integer(capsys, text, shown):
    with pytest.raises(SystemExit) as exit:
        main(["info", "--vocab-size", text, "--forward", "tiny"])
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert f"--vocab-size: must be a positive integer, got {shown}" in err and "invalid" not in err


def train_parser() -> argparse.ArgumentParser:
    return commands()["train"]


@pytest.mark.parametrize("flag, value, words", [
    ("--context-length", "0", "must be positive, got 0"),
    ("--tokens-per-step", "0", "must be positive, got 0"),
    ("--seed", "1e20", "must be an integer from -2**63 to 2**63 - 1, got 1e20"),
    ("--seed", "x", "must be an integer, got 'x'"),
    ("--max-steps", "2.5", "must be an integer, got '2.5'"),
    ("--lr", "nan", "must be a finite number, got nan"),
    ("--lr", "-1e-3", "must be a finite number >= 0, got -1e-3"),
    ("--warmup-steps", "-1", "must be >= 0, got -1"),
    ("--grad-clip", "-1", "must be a finite number >= 0, got -1"),
    ("--beta2", "1", "must be in [0, 1), got 1"),
    ("--dropout", "1.5", "must be in [0, 1], got 1.5"),
    ("--sample-tokens", "-5", "must be >= 0, got -5"),
    ("--ddp-timeout", "1e20", "must be positive and at most 1e+09 seconds, got 1e20"),
])
def test_a_numeric_option_out_of_its_range_is_refused_at_parse_time(capsys, flag, value, words):
    """Each option's type and range come from its declaration and are checked as the command line is
    read, before anything runs (issue 30): one line naming the option, after a one-line usage."""
    with pytest.raises(SystemExit) as exit:
        train_parser().parse_args([f"{flag}={value}"])
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert err == f"usage: gptfast train [DATA ...] [options]\ngptfast train: error: argument {flag}: {words}\n"


@pytest.mark.parametrize("value", ["1e20", "x"])
def test_generate_takes_a_seed_as_train_does(capsys, value):
    with pytest.raises(SystemExit) as exit:
        build_parser().parse_args(["generate", "--checkpoint", "ckpt.pt", "--seed", value])
    assert exit.value.code == 2
    assert "argument --seed: must be an integer" in capsys.readouterr().err


def test_every_numeric_train_option_reads_its_type_from_its_declaration(capsys):
    from gptfast.config import OPTIONS

    numeric = [o for o in OPTIONS.values() if o.type in (int, float)]
    assert len(numeric) >= 20
    for declared in numeric:
        with pytest.raises(SystemExit):
            train_parser().parse_args([declared.spelling, "many"])
        kind = "an integer" if declared.type is int else "a number"
        assert f"argument {declared.spelling}: must be {kind}, got 'many'" in capsys.readouterr().err


def test_zero_means_zero(monkeypatch):
    """A value of 0 is that value, never "not given" (issue 30: --context-length 0 used to train at 128)."""
    from gptfast.config import TrainConfig

    seen = []
    monkeypatch.setattr("gptfast.cli.train", lambda cfg: seen.append(cfg) or {})
    assert main(["train", "--dropout", "0", "--grad-clip", "0", "--lr", "0", "--warmup-steps", "0",
                 "--sample-tokens", "0", "--z-loss", "0", "--max-steps", "1e4"]) == 0
    cfg = seen[0]
    assert (cfg.dropout, cfg.grad_clip, cfg.lr, cfg.warmup_steps, cfg.sample_tokens, cfg.z_loss) == (0, 0, 0, 0, 0, 0)
    assert cfg.max_steps == 10_000 and isinstance(cfg.max_steps, int)
    assert {"dropout", "grad_clip", "lr", "warmup_steps"} <= cfg.given
    assert TrainConfig(min_lr=0.0).min_lr == 0.0
