"""What a training run reports: ``log.jsonl``, the progress bar, the console, and ``loss.png``.

``log.jsonl`` holds one JSON object per line: ``{"step", "loss", "lr", "tokens_per_sec",
"grad_norm"[, "mfu"]}`` every ``log_interval`` steps and ``{"step", "val_loss"}`` at each
validation. A resumed run first cuts it back to the checkpoint's step, so every step appears once.
Only the main process writes and prints.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path
from typing import Iterator, TextIO

LOG_FILE = "log.jsonl"
PLOT_FILE = "loss.png"


def open_log(path: Path, resume_step: int | None) -> TextIO:
    """log.jsonl for appending: emptied for a new run; on resume, cut back to the checkpoint's step."""
    if resume_step is not None and path.is_file():
        kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= resume_step]
        path.write_text("".join(line + "\n" for line in kept))
        return open(path, "a")
    return open(path, "w")


class Throughput:
    """Tokens per second, and model FLOPs utilisation when the peak is known, over the steps since the
    last measurement; time spent inside :meth:`paused` (validation, checkpoints) does not count."""

    def __init__(self, step: int, tokens_per_step: int, flops_per_step: float, peak_flops: float | None):
        self._tokens_per_step, self._flops_per_step, self._peak_flops = tokens_per_step, flops_per_step, peak_flops
        self._step, self._start = step, time.perf_counter()

    def measure(self, step: int) -> tuple[float, float | None]:
        """(tokens per second, MFU or None) since the last measurement, which restarts the clock."""
        elapsed, steps = time.perf_counter() - self._start, step - self._step
        self._step, self._start = step, time.perf_counter()
        mfu = steps * self._flops_per_step / elapsed / self._peak_flops if self._peak_flops else None
        return steps * self._tokens_per_step / elapsed, mfu

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self._start += time.perf_counter() - start


class RunLog:
    """log.jsonl, the progress bar and the validation lines of one run; closes them on leaving ``with``."""

    def __init__(self, out_dir: Path, *, main: bool, resume_step: int | None, step: int, max_steps: int,
                 progress: bool):
        from tqdm import tqdm

        self._main = main
        self._file = open_log(out_dir / LOG_FILE, resume_step) if main else None
        self._bar = tqdm(total=max_steps, initial=step, desc="training", dynamic_ncols=True,
                         disable=not (main and progress))
        self._speed = "speed not measured yet"

    def __enter__(self) -> "RunLog":
        return self

    def __exit__(self, *exc) -> None:
        self._bar.close()
        if self._file is not None:
            self._file.close()

    def advance(self) -> None:
        """One more step done (the progress bar)."""
        self._bar.update(1)

    def train(self, step: int, loss: float, lr: float, grad_norm: float | None, tokens_per_sec: float,
              mfu: float | None) -> None:
        """A training line; ``grad_norm`` is inf on a step float16 overflow skipped (logged as null)."""
        entry = {"step": step, "loss": round(loss, 6), "lr": lr, "tokens_per_sec": round(tokens_per_sec, 1),
                 "grad_norm": round(grad_norm, 4) if grad_norm is not None and math.isfinite(grad_norm) else None}
        if mfu is not None:
            entry["mfu"] = round(mfu, 4)
        self._record(entry)
        self._speed = f"{tokens_per_sec:,.0f} tokens/s" + (f", MFU {entry['mfu']:.1%}" if "mfu" in entry else "")
        self._bar.set_postfix_str(f"loss {loss:.4f}, lr {lr:.2e}, {self._speed}")

    def validation(self, step: int, val_loss: float, train_loss: float | None) -> None:
        """A validation line, and its report on the console."""
        self._record({"step": step, "val_loss": round(val_loss, 6)})
        if self._main:
            train_text = f"{train_loss if train_loss is not None else float('nan'):.4f}"
            self._bar.write(f"step {step}: train loss {train_text}, val loss {val_loss:.4f} ({self._speed})")

    def _record(self, entry: dict) -> None:
        if self._file is not None:
            self._file.write(json.dumps(entry) + "\n")
            self._file.flush()


def plot_losses(log_path: Path, png_path: Path) -> Path | None:
    """A loss-curve PNG from the JSON-lines log (None when matplotlib is missing)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    records = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    for points, label in ((train, "train"), (val, "validation")):
        if points:
            ax.plot(*zip(*points), label=label, marker="o" if label == "validation" else None)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return png_path
