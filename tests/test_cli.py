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
    tiny = next(line for line in out.splitlines() if line.startswith("tiny "))
    assert tiny.split()[5] == tiny_parameters(50257)


def test_info_refuses_a_vocabulary_below_one(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["info", "--vocab-size", "0"])
    assert exit.value.code == 2
    assert "--vocab-size: must be a positive integer, got 0" in capsys.readouterr().err
