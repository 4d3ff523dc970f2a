"""The README's examples, run, so that the README cannot drift from the code.

The rules:
- Every fenced ``bash`` and ``python`` block runs, unless the line before it (blank lines aside) is
  ``<!-- no-test: REASON -->`` (hidden when the README is rendered): a GPU, a network, a run of
  minutes, or an install into the environment. The reason is required. Other blocks are not run.
- The blocks run in README order in one scratch folder, as a reader following the walk-through
  would: a block may use what an earlier one made (``data/mine``, ``out/``). The folder starts
  with the inputs the examples name as placeholders: ``my_texts/`` and ``notes.txt`` (the embedded
  corpus).
- bash blocks run under ``bash -euo pipefail`` with this Python environment's bin folder first on
  PATH (its ``gptfast``, ``python`` and ``torchrun``); python blocks run with this Python. Neither
  sees ``TRITON_INTERPRET`` or ``GPTFAST_BACKEND`` (a reader's shell has no test-suite settings).
- The table of training options, between ``<!-- train-options: ... -->`` and ``<!-- /train-options -->``,
  is ``gptfast.config.option_table()``: regenerate it with ``python -c "from gptfast.config import
  option_table; print(option_table())"`` and paste it between the markers.
- Long runs are shortened by exact replacements, the only changes made to the text (SHORTENED):
  the walk-through's 5000 training steps become 4, and the first run stops after 2 of them, as a
  Ctrl-C would stop it, so that ``--resume`` has steps left; ``mini`` becomes ``tiny``.
"""

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
RUN = ("bash", "python")
NO_TEST = re.compile(r"<!--\s*no-test:(.*?)-->")
SHORTENED = [("--max-steps 5000", "--max-steps 4 --run-steps 2"), ("max_steps=5000", "max_steps=4"),
             ("--preset mini", "--preset tiny"), ('preset="mini"', 'preset="tiny"')]
BLOCK_TIMEOUT_S = 300


@dataclass
class Block:
    line: int  # of the opening fence, 1-based
    language: str
    code: str
    skip_reason: str | None  # the no-test marker's reason, None when the block runs


def readme_blocks(text: str) -> list[Block]:
    """Every fenced block, with the no-test marker before it if any; a marker not before a block is an error."""
    blocks, lines, i = [], text.splitlines(), 0
    marker = None  # (line, reason) of a no-test marker waiting for its block
    while i < len(lines):
        line = lines[i]
        found = NO_TEST.search(line)
        if found:
            assert marker is None, f"README.md:{marker[0]}: a no-test marker with no block after it"
            marker = (i + 1, found.group(1).strip())
        elif line.startswith("```"):
            end = next((j for j in range(i + 1, len(lines)) if lines[j].startswith("```")), None)
            assert end is not None, f"README.md:{i + 1}: a fenced block that never closes"
            blocks.append(Block(i + 1, line[3:].strip(), "\n".join(lines[i + 1:end]) + "\n",
                                marker[1] if marker else None))
            marker, i = None, end
        elif line.strip() and marker is not None:
            raise AssertionError(f"README.md:{marker[0]}: a no-test marker with no block right after it")
        i += 1
    assert marker is None, f"README.md:{marker[0]}: a no-test marker with no block after it"
    return blocks


def shortened(code: str) -> str:
    for long, short in SHORTENED:
        code = code.replace(long, short)
    return code


def test_every_marker_gives_a_reason_and_precedes_a_block():
    blocks = readme_blocks(README.read_text(encoding="utf-8"))
    assert all(block.skip_reason for block in blocks if block.skip_reason is not None), \
        [block.line for block in blocks if block.skip_reason == ""]
    runnable = [block for block in blocks if block.language in RUN and block.skip_reason is None]
    assert len(runnable) >= 4, "the README's runnable examples were not found"


def test_the_rules_read_markers_and_blocks():
    text = "x\n<!-- no-test: needs a GPU -->\n\n```bash\nnvidia-smi\n```\n```python\nprint(1)\n```\n"
    assert [(b.line, b.language, b.code, b.skip_reason) for b in readme_blocks(text)] == [
        (4, "bash", "nvidia-smi\n", "needs a GPU"), (7, "python", "print(1)\n", None)]
    with pytest.raises(AssertionError, match="no block right after it"):
        readme_blocks("<!-- no-test: a GPU -->\nsome text\n```bash\nls\n```\n")
    assert shortened("gptfast train d --preset mini --max-steps 5000") == \
        "gptfast train d --preset tiny --max-steps 4 --run-steps 2"


def scratch_folder(root: Path) -> Path:
    from gptfast.data import default_corpus

    corpus = default_corpus()
    (root / "my_texts").mkdir()
    (root / "my_texts" / "topics.txt").write_text(corpus, encoding="utf-8")
    (root / "notes.txt").write_text(corpus, encoding="utf-8")
    return root


def run_block(block: Block, folder: Path, env: dict) -> subprocess.CompletedProcess:
    code = shortened(block.code)
    command = ["bash", "-euo", "pipefail", "-c", code] if block.language == "bash" else [sys.executable, "-c", code]
    return subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True, timeout=BLOCK_TIMEOUT_S)


def test_the_readme_examples_run(tmp_path):
    blocks = [b for b in readme_blocks(README.read_text(encoding="utf-8")) if b.language in RUN and not b.skip_reason]
    folder = scratch_folder(tmp_path)
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
               MPLBACKEND="Agg")
    for name in ("GPTFAST_BACKEND", "TRITON_INTERPRET"):  # a reader's shell has none of the test suite's settings
        env.pop(name, None)
    failures = []
    for block in blocks:
        result = run_block(block, folder, env)
        if result.returncode:
            tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-8:])
            failures.append(f"README.md:{block.line} ({block.language}) exited {result.returncode}:\n{tail}")
    assert not failures, "\n\n".join(failures)


def test_the_training_option_table_is_the_declarations():
    text = README.read_text(encoding="utf-8")
    found = re.search(r"<!-- train-options:[^>]*-->\n(.*?)<!-- /train-options -->", text, re.DOTALL)
    assert found, "README.md has no table of training options between its markers"
    from gptfast.config import option_table

    assert found.group(1) == option_table(), "README.md's table of training options is out of date: regenerate " \
        "it with python -c \"from gptfast.config import option_table; print(option_table())\""
