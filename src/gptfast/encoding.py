"""Tokenizing in worker processes, the results in their input's order, memory bounded.

``gptfast prepare`` cuts its input into jobs of about a megabyte of text (whole documents, or
blocks of one that end at a line break), the same cuts whatever the number of workers; each job is
encoded whole, so the token ids, and the file they make, are the same for every ``--workers``. At
most :data:`JOBS_PER_WORKER` jobs per worker are in flight: memory stays bounded whatever the
corpus size (the most text held at once is :attr:`OrderedEncoder.peak_pending_chars`). One
worker encodes in this process; so does any number while the input is one job.
"""

from __future__ import annotations

import collections
import itertools
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Any

import numpy as np

from .tokenizer import Tokenizer, tokenizer_from_dict

JOBS_PER_WORKER = 2  # jobs queued per worker: one encoding, one waiting
MAX_WORKERS = 512  # a pool forks all its processes at once: a mistyped count must not fork thousands

_worker_tokenizer: tuple[Tokenizer, np.dtype] | None = None


def default_workers() -> int:
    """The cores this process may run on (at most MAX_WORKERS)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return min(cores, MAX_WORKERS)


def worker_count(value: int) -> str | None:
    """What is wrong with ``value`` as a number of workers, or None."""
    return None if 1 <= value <= MAX_WORKERS else f"must be from 1 to {MAX_WORKERS}"


def encode_texts(texts: list[str], tokenizer: Tokenizer, dtype: np.dtype) -> list[np.ndarray]:
    """Each text's token ids, as ``dtype``."""
    return [np.asarray(tokenizer.encode(text), dtype=dtype) for text in texts]


def _start_worker(tokenizer: dict, tiktoken_file: str | None, dtype: str, parent: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C stops the main process, which ends the workers
    threading.Thread(target=_exit_without, args=(parent,), daemon=True).start()
    global _worker_tokenizer
    _worker_tokenizer = tokenizer_from_dict(tokenizer, tiktoken_file=tiktoken_file), np.dtype(dtype)


def _exit_without(parent: int) -> None:
    """A worker's watch: once its main process is gone (killed with -9, say), it ends too."""
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(1)


def _encode_in_worker(texts: list[str]) -> list[np.ndarray]:
    return encode_texts(texts, *_worker_tokenizer)


class OrderedEncoder:
    """Encodes jobs (each a list of ``(text, anything)``) in ``workers`` processes; :meth:`map` yields
    ``(job, ids of each text)`` in the jobs' order. A marker that is not a list passes through once
    every job before it is out."""

    def __init__(self, tokenizer: Tokenizer, dtype: np.dtype, workers: int, tiktoken_file: str | None = None):
        problem = worker_count(workers)
        if problem:
            raise ValueError(f"workers {problem}, got {workers}")
        self.tokenizer, self.dtype, self.workers = tokenizer, np.dtype(dtype), workers
        self.tiktoken_file = tiktoken_file
        self.peak_pending_chars = 0  # the most text (in characters) being encoded at once

    def _pool(self) -> ProcessPoolExecutor:
        methods = multiprocessing.get_all_start_methods()
        context = multiprocessing.get_context("fork" if "fork" in methods else None)  # fork: no re-import
        arguments = (self.tokenizer.to_dict(), self.tiktoken_file, self.dtype.name, os.getpid())
        return ProcessPoolExecutor(self.workers, mp_context=context, initializer=_start_worker, initargs=arguments)

    def map(self, jobs: Iterable[Any]) -> Iterator[Any]:
        jobs = iter(jobs)
        head = list(itertools.islice(jobs, 2))
        if self.workers == 1 or len(head) < 2:
            for job in itertools.chain(head, jobs):
                yield self._here(job)
            return
        pool = self._pool()
        try:
            yield from self._in_order(pool, itertools.chain(head, jobs))
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def _here(self, job: Any) -> Any:
        """A job encoded in this process (a marker as it is)."""
        if not isinstance(job, list):
            return job
        self.peak_pending_chars = max(self.peak_pending_chars, sum(len(text) for text, _ in job))
        return job, encode_texts([text for text, _ in job], self.tokenizer, self.dtype)

    def _in_order(self, pool: ProcessPoolExecutor, jobs: Iterator[Any]) -> Iterator[Any]:
        pending: collections.deque[tuple[Any, Future, int]] = collections.deque()
        held = 0
        for job in jobs:
            if not isinstance(job, list):  # a marker: every job before it first
                while pending:
                    held -= pending[0][2]
                    yield _result(pending.popleft())
                yield job
                continue
            size = sum(len(text) for text, _ in job)
            pending.append((job, pool.submit(_encode_in_worker, [text for text, _ in job]), size))
            held += size
            self.peak_pending_chars = max(self.peak_pending_chars, held)
            if len(pending) >= JOBS_PER_WORKER * self.workers:
                held -= pending[0][2]
                yield _result(pending.popleft())
        while pending:
            yield _result(pending.popleft())


def _result(entry: tuple[Any, Future, int]) -> tuple[Any, list[np.ndarray]]:
    job, future, _ = entry
    return job, future.result()
