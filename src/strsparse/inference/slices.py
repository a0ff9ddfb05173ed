"""Slices of a batch computed side by side, one per thread.

A sparse network at batch 1 runs layers of tens of microseconds, too short to split well
over threads, with Python in between that only one thread runs at a time. A batch in
slices splits better: each thread computes whole slices, with one-thread kernels (and
one-thread PyTorch ops where PyTorch's OpenMP runtime takes a per-thread setting), and the
native kernels release the GIL while they run, so the threads overlap all but the Python
between layers.
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import cast

import torch
from torch import Tensor

from strsparse.inference._native import backend

__all__ = ["map_slices"]


def _openmp_setter() -> Callable[[int], None] | None:
    """``omp_set_num_threads`` of the OpenMP runtime PyTorch loaded, if any: PyTorch's own
    ``set_num_threads`` sets every thread's count, but OpenMP keeps one per thread, which is
    what a slice's thread needs for the PyTorch ops between its kernels (a dense layer)."""
    try:
        setter = ctypes.CDLL(None).omp_set_num_threads
    except (AttributeError, OSError, TypeError):
        return None
    setter.argtypes = [ctypes.c_int]
    setter.restype = None
    return cast(Callable[[int], None], setter)


_set_openmp_threads = _openmp_setter()


def _torch_threads_here(threads: int) -> int | None:
    """Set the calling thread's number of PyTorch (OpenMP) threads; the previous number, or
    ``None`` where it cannot be set for one thread."""
    if _set_openmp_threads is None:
        return None
    previous = torch.get_num_threads()  # also lets PyTorch set this thread up first
    _set_openmp_threads(threads)
    return previous


_pool: ThreadPoolExecutor | None = None
_pool_size = 0
_pool_lock = threading.Lock()


def _forget_pool() -> None:
    """In a forked child: the pool's threads were not copied, so the next call makes one."""
    global _pool, _pool_size, _pool_lock
    _pool, _pool_size, _pool_lock = None, 0, threading.Lock()


os.register_at_fork(after_in_child=_forget_pool)


def _helpers(count: int) -> ThreadPoolExecutor:
    """A pool of at least ``count`` threads."""
    global _pool, _pool_size
    with _pool_lock:
        if _pool is None or _pool_size < count:
            if _pool is not None:
                _pool.shutdown(wait=False)
            _pool = ThreadPoolExecutor(count, thread_name_prefix="strsparse-slices")
            _pool_size = count
        return _pool


class _Job:
    """Slices handed out one at a time, so that a thread the OS runs late takes fewer."""

    def __init__(self, fn: Callable[[Tensor], Tensor], parts: Sequence[Tensor]) -> None:
        self.fn = fn
        self.parts = parts
        self.results: list[Tensor | None] = [None] * len(parts)
        self.error: BaseException | None = None
        self.grad = torch.is_grad_enabled()
        self.inference = torch.is_inference_mode_enabled()
        self._next = 0
        self._left = len(parts)
        self._lock = threading.Lock()
        self.done = threading.Event()

    def _claim(self) -> int | None:
        with self._lock:
            if self._next >= len(self.parts) or self.error is not None:
                return None
            self._next += 1
            return self._next - 1

    def _finish(self, count: int, error: BaseException | None = None) -> None:
        with self._lock:
            if error is not None and self.error is None:
                self.error = error
                count += len(self.parts) - self._next  # nobody will take the rest
                self._next = len(self.parts)
            self._left -= count
            if self._left == 0:
                self.done.set()

    def work(self) -> None:
        """Compute slices until none is left, with the caller's grad and inference modes
        and one-thread kernels."""
        limit = backend().limit_threads(1)
        torch_threads = _torch_threads_here(1)
        try:
            with torch.inference_mode(self.inference), torch.set_grad_enabled(self.grad):
                while (i := self._claim()) is not None:
                    try:
                        self.results[i] = self.fn(self.parts[i])
                    except BaseException as exc:
                        self._finish(1, exc)
                        return
                    self._finish(1)
        finally:
            backend().limit_threads(limit)
            if torch_threads is not None:
                _torch_threads_here(torch_threads)


def map_slices(
    fn: Callable[[Tensor], Tensor], parts: Sequence[Tensor], threads: int
) -> list[Tensor]:
    """``[fn(part) for part in parts]``, computed on up to ``threads`` threads (the caller's
    and helpers), each slice on one thread with one-thread native kernels; the slices left
    over when they do not divide evenly among the threads (one of 3 on 2 threads) run after,
    one at a time on all the threads, instead of on one while the others wait."""
    if threads < len(parts) and len(parts) % threads:
        whole = len(parts) - len(parts) % threads
        return map_slices(fn, parts[:whole], threads) + [fn(part) for part in parts[whole:]]
    job = _Job(fn, parts)
    helpers = min(threads, len(parts)) - 1
    if helpers > 0:
        pool = _helpers(helpers)
        for _ in range(helpers):
            pool.submit(job.work)
    job.work()
    # wait for the slices other threads are computing, not for helpers that have not started
    # (busy with another caller's slices): those find nothing left to take
    job.done.wait()
    if job.error is not None:
        raise job.error
    return cast(list[Tensor], job.results)
