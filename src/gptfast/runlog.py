"""What a training run reports: ``log.jsonl``, the console, TensorBoard, and ``loss.png``.

``log.jsonl`` holds one JSON object per line: ``{"step", "loss", "lr", "tokens_per_sec",
"grad_norm"[, "mfu"]}`` every ``log_interval`` steps, ``{"step", "val_loss"}`` at each validation
and ``{"step", "hellaswag_acc", "hellaswag_acc_norm"}`` at each HellaSwag scoring; a value that is
not finite is written as null, so every line is valid JSON (and is read as null from a log that
holds one, an older one or a hand-edited one). A resumed run first cuts it back to the checkpoint's
step, so every step appears once; the cut copy replaces the file by a rename, the file and its
folder flushed to the disk, so a run killed meanwhile leaves the old log or the new one. A last line
cut short (a run killed mid-write) is dropped with a warning. A write the disk or the file size
limit refuses is one error naming the file; ``loss.png`` is written the same way. The console shows
a progress bar on a terminal, else (and with ``progress=False``) one line every ``log_interval``
steps. Only the main process writes and prints.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

from .durable import write_atomic, write_failure
from .outputs import LOG_FILE, TENSORBOARD_DIR


def read_log(path: Path) -> list[dict]:
    """The records of a log.jsonl, a value that is not finite (NaN, Infinity, 1e999) read as None. A last
    line that is not a whole record (a write cut short) is dropped with a warning; a bad line elsewhere
    is an error naming the file and the line."""
    lines = path.read_text(encoding="utf-8", errors="replace").split("\n")
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line, parse_constant=lambda name: None,
                                parse_float=lambda text: _finite_or_none(float(text)))
            if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                raise ValueError("not an object with an integer step")
        except ValueError as error:
            if i == last:
                print(f"warning: {path}, line {i + 1}: dropped, not a whole record (a write cut short?)",
                      file=sys.stderr)
                continue
            reason = error.msg if isinstance(error, json.JSONDecodeError) else str(error)
            raise ValueError(f"{path}, line {i + 1}: not a log record ({reason}); "
                             "delete the line or the file") from None
        records.append(record)
    return records


def open_log(path: Path, resume_step: int | None) -> TextIO:
    """log.jsonl for appending: emptied for a new run; on resume, cut back to the checkpoint's step."""
    if resume_step is not None and path.is_file():
        kept = [r for r in read_log(path) if r["step"] <= resume_step]
        write_atomic(path, "".join(json.dumps(r, allow_nan=False) + "\n" for r in kept))
        return open(path, "a", encoding="utf-8")
    return open(path, "w", encoding="utf-8")


def _finite_or_none(value):
    return None if isinstance(value, float) and not math.isfinite(value) else value


def require_tensorboard():
    """TensorBoard's SummaryWriter, or an error saying which package it needs."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ImportError("TensorBoard logging (tensorboard=True, --tensorboard) needs the tensorboard "
                          "package: pip install tensorboard") from None
    return SummaryWriter


def _tensorboard_writer(out_dir: Path, resume_step: int | None):
    # purge_step drops what an earlier run logged past the checkpoint it is resumed from.
    return require_tensorboard()(str(out_dir / TENSORBOARD_DIR),
                                 purge_step=None if resume_step is None else resume_step + 1)


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
    """log.jsonl, the console (a progress bar, or a line per log), TensorBoard when asked, and the
    validation lines of one run; closes them on leaving ``with``."""

    def __init__(self, out_dir: Path, *, main: bool, resume_step: int | None, step: int, max_steps: int,
                 progress: bool, tensorboard: bool = False):
        from tqdm import tqdm

        self._main, self._max_steps = main, max_steps
        self._tensorboard = _tensorboard_writer(out_dir, resume_step) if main and tensorboard else None
        self._path = out_dir / LOG_FILE
        self._file = open_log(self._path, resume_step) if main else None
        # A bar redraws itself with carriage returns: only on a terminal, never into a log file.
        self._lines = main and not (progress and sys.stderr.isatty())
        self._bar = tqdm(total=max_steps, initial=step, desc="training", dynamic_ncols=True,
                         disable=not main or self._lines)
        self._speed = "speed not measured yet"

    def __enter__(self) -> RunLog:
        return self

    def __exit__(self, *exc) -> None:
        self._bar.close()
        if self._file is not None:
            self._file.close()
        if self._tensorboard is not None:
            self._tensorboard.close()

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
        report = f"loss {loss:.4f}, lr {lr:.2e}, {self._speed}"
        if self._lines:
            print(f"step {step}/{self._max_steps}: {report}", flush=True)
        else:
            self._bar.set_postfix_str(report)

    def validation(self, step: int, val_loss: float, train_loss: float | None) -> None:
        """A validation line, and its report on the console."""
        self._record({"step": step, "val_loss": round(val_loss, 6)})
        if self._main:
            train_text = f"train loss {train_loss:.4f}, " if train_loss is not None else ""
            self._bar.write(f"step {step}: {train_text}val loss {val_loss:.4f} ({self._speed})")

    def hellaswag(self, step: int, result) -> None:
        """A HellaSwag line (a :class:`~gptfast.hellaswag.Score`), and its report on the console."""
        self._record({"step": step, "hellaswag_acc": round(result.acc, 6),
                      "hellaswag_acc_norm": round(result.acc_norm, 6)})
        if self._main:
            self._bar.write(f"step {step}: HellaSwag acc {result.acc:.4f}, acc_norm {result.acc_norm:.4f} "
                            f"({result.examples:,} examples)")

    def _record(self, entry: dict) -> None:
        entry = {key: _finite_or_none(value) for key, value in entry.items()}
        if self._file is not None:
            line = json.dumps(entry, allow_nan=False) + "\n"
            try:
                self._file.write(line)
                self._file.flush()
            except OSError as error:
                raise write_failure(self._path, len(line), error) from None
        if self._tensorboard is not None:
            for key, value in entry.items():
                if key != "step" and value is not None:
                    self._tensorboard.add_scalar(key, value, entry["step"])


def plot_losses(log_path: Path, png_path: Path) -> Path | None:
    """A loss-curve PNG from the JSON-lines log, written by :func:`~gptfast.durable.write_atomic` (None
    when matplotlib is missing)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    records = read_log(log_path)
    train = [(r["step"], r["loss"]) for r in records if r.get("loss") is not None]
    val = [(r["step"], r["val_loss"]) for r in records if r.get("val_loss") is not None]
    fig, ax = plt.subplots(figsize=(7, 4))
    for points, label in ((train, "train"), (val, "validation")):
        if points:
            ax.plot(*zip(*points), label=label, marker="o" if label == "validation" else None)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy loss")
    if train or val:  # a run shorter than its log interval has no curve yet (and no legend to draw)
        ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=100)
    plt.close(fig)
    write_atomic(png_path, png.getvalue())
    return png_path
