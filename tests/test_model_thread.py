"""modeling.model_thread: every model call of a server on one OS thread (one OpenMP team; the module
says why), and the Space's service using it whoever calls."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from modeling.model_thread import ModelThread


def test_calls_run_on_one_thread_and_answer_in_the_callers():
    mt = ModelThread()
    try:
        with ThreadPoolExecutor(4) as callers:
            seen = list(callers.map(lambda i: mt.call(lambda x: (threading.get_ident(), x * 2), i), range(12)))
        assert {ident for ident, _ in seen} == {mt.ident}
        assert mt.ident != threading.get_ident()
        assert [x for _, x in seen] == [2 * i for i in range(12)]
    finally:
        mt.close()


def test_an_exception_reaches_the_caller_and_the_thread_keeps_serving():
    mt = ModelThread()
    try:
        with pytest.raises(KeyError, match="boom"):
            mt.call(lambda: {}["boom"])
        assert mt.call(lambda: 7) == 7
    finally:
        mt.close()


def test_a_call_from_the_model_thread_itself_runs_directly():
    mt = ModelThread()
    try:
        # would deadlock on a one-worker pool without the direct path
        assert mt.call(lambda: mt.call(lambda: threading.get_ident())) == mt.ident
    finally:
        mt.close()


def test_threads_sets_torch_threads_on_the_model_thread_only():
    import torch

    before = torch.get_num_threads()
    want = 2 if before == 1 else 1  # another count than the caller's
    mt = ModelThread(threads=want)
    try:
        assert mt.call(torch.get_num_threads) == want
        assert torch.get_num_threads() == before
    finally:
        mt.close()


def test_closed_thread_says_so():
    mt = ModelThread()
    mt.close()
    with pytest.raises(RuntimeError, match="model thread is closed"):
        mt.call(lambda: 1)
