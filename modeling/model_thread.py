"""One OS thread for every model call of a long-lived process (a server).

Why: PyTorch's CPU kernels run on OpenMP (libgomp in the pip wheels), and libgomp keeps a team of
worker threads per *calling* thread. A server that calls the model from whichever request thread is
free (Gradio runs handlers on a pool of worker threads) soon has several teams. Once libgomp manages
more threads than the machine has cores it stops spinning between parallel regions (it "throttles"),
and from then on every pass is slower, on every thread, the main one included. Measured on this
project's 2-core machine (DINOv2-small, bf16): a plain pass 28 -> 50 ms and a pass with Grad-CAM
45 -> 67 ms as soon as a second thread has called the model; the Space's own ``latency_ms``
(``benchmarks/space_latency.py``) was 72 ms against 48 ms for the same work in one thread.

:class:`ModelThread` runs what it is given on one dedicated thread, so the process keeps one team:
load the model there too (``ModelThread.call(Predictor.from_pretrained, ...)``), since loading runs
parallel copies that start the loading thread's team. Python's own threads are untouched; only the
model's work is funnelled. No library does this for a plain ``nn.Module`` (``torch.set_num_threads``
and ``OMP_WAIT_POLICY`` change how many threads and how they wait, not which thread calls), hence
this small class.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

__all__ = ["ModelThread"]

T = TypeVar("T")


class ModelThread:
    """Runs calls on one dedicated thread, one at a time, in the order they arrive.

    ``call(fn, *args, **kwargs)`` returns ``fn``'s result or raises its exception, in the caller's
    thread. A call made from the model thread itself (a function that calls ``call`` again) runs
    directly, so nesting cannot deadlock. ``threads``: ``torch.set_num_threads`` on the model thread
    first, so the count is set where the passes run whatever the process did before."""

    def __init__(self, name: str = "cxr-model", threads: int | None = None) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._ident: int | None = self._pool.submit(threading.get_ident).result()
        if threads is not None:
            import torch

            self.call(torch.set_num_threads, int(threads))

    @property
    def ident(self) -> int | None:
        """The model thread's ``threading.get_ident()``."""
        return self._ident

    def call(self, fn: Callable[..., T], /, *args, **kwargs) -> T:
        if threading.get_ident() == self._ident:
            return fn(*args, **kwargs)
        try:
            future = self._pool.submit(fn, *args, **kwargs)
        except RuntimeError as exc:  # submit after shutdown
            raise RuntimeError("the model thread is closed") from exc
        return future.result()

    def close(self) -> None:
        """Finish the calls already submitted, then end the thread."""
        self._pool.shutdown(wait=True)
