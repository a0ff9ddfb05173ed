"""Sparse inference on several threads: batches in slices side by side, kernels called from
two threads at once, and a forked child; every output equal to the one-thread output."""

from __future__ import annotations

import io
import math
import os
import select
import signal
import threading

import pytest
import torch
from torch import nn

import strsparse
from strsparse.inference import backend, slices, to_sparse
from strsparse.inference.layers import SparseLinear
from strsparse.inference.slices import map_slices

needs_native = pytest.mark.skipif(
    not backend().native, reason="the native kernels could not be built on this machine"
)


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = strsparse.create_model("resnet20", shortcut="B")
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    strsparse.sparsify(model, "magnitude", sparsity=0.9)
    return strsparse.finalize(model).eval()


def _slices_module(sparse: nn.Module) -> nn.Module:
    """What runs each slice of a batch: the network, or its head where the Linear tail runs
    once on the whole batch."""
    return sparse.net if sparse._split is None else sparse._split[0]


def _prune_linear(layer: nn.Module, sparsity: float) -> nn.Module:
    strsparse.sparsify(layer, "magnitude", sparsity=sparsity)
    return strsparse.finalize(layer).eval()


def _on_threads(model: nn.Module, x: torch.Tensor, threads: int) -> torch.Tensor:
    saved = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        with torch.inference_mode():
            return model(x)
    finally:
        torch.set_num_threads(saved)


@needs_native
def test_slices_side_by_side_give_the_one_thread_outputs() -> None:
    sparse = to_sparse(_model())
    sparse.replay = False  # the hook below sees module calls, which a replayed pass skips
    assert sparse.per_sample
    x = torch.randn(5, 3, 160, 160)  # 76,800 values a sample: slices of one sample
    saved_threads = torch.get_num_threads()
    threads_seen: set[str] = set()

    torch_threads_seen: set[int] = set()

    both_seen = threading.Event()

    def note_thread(module: nn.Module, args: tuple) -> None:
        threads_seen.add(threading.current_thread().name)
        torch_threads_seen.add(torch.get_num_threads())
        if len(threads_seen) > 1:
            both_seen.set()
        both_seen.wait(5)  # a slice lasts until a second thread has taken one

    one = _on_threads(sparse, x, 1)
    handle = _slices_module(sparse).register_forward_pre_hook(note_thread)
    try:
        two = _on_threads(sparse, x, 2)
        assert len(threads_seen) > 1  # the slices ran on more than one thread
        if slices._set_openmp_threads is not None:  # PyTorch's ops, one thread a slice too
            assert 1 in torch_threads_seen
            # the fifth slice, left over, runs alone on both threads
            assert 2 in torch_threads_seen
        three = _on_threads(sparse, x, 3)
    finally:
        handle.remove()
    assert torch.equal(one, two) and torch.equal(one, three)
    try:
        torch.set_num_threads(2)
        with torch.inference_mode():
            sparse(x)
        assert torch.get_num_threads() == 2  # the caller's own setting is back
    finally:
        torch.set_num_threads(saved_threads)
    with torch.inference_mode():
        torch.testing.assert_close(one, sparse.net(x), rtol=0, atol=1e-6)


@needs_native
def test_slices_keep_the_callers_grad_mode_and_raise_its_errors() -> None:
    sparse = to_sparse(_model())
    x = torch.randn(3, 3, 160, 160)
    with torch.no_grad():
        saved = torch.get_num_threads()
        torch.set_num_threads(2)
        try:
            out = sparse(x)
            assert not out.requires_grad and not out.is_inference()

            def fail(module: nn.Module, args: tuple) -> None:
                raise ValueError("a bad slice")

            handle = _slices_module(sparse).register_forward_pre_hook(fail)
            with pytest.raises(ValueError, match="a bad slice"):
                sparse(x)
            handle.remove()
            torch.testing.assert_close(sparse(x), out, rtol=0, atol=0)  # still works
        finally:
            torch.set_num_threads(saved)


@needs_native
def test_two_python_threads_call_the_kernels_at_once() -> None:
    """Both callers share the kernels' thread pool (one job at a time): no deadlock, no mixed
    outputs."""
    sparse = to_sparse(_model())
    inputs = [torch.randn(n, 3, 64, 64) for n in (1, 2)]
    expected = [_on_threads(sparse, x, 1) for x in inputs]
    failures: list[str] = []

    def call(i: int) -> None:
        with torch.inference_mode():
            for _ in range(20):
                if not torch.equal(sparse(inputs[i]), expected[i]):
                    failures.append(f"caller {i}: outputs differ")
                    return

    saved = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        callers = [threading.Thread(target=call, args=(i,)) for i in range(2)]
        for t in callers:
            t.start()
        for t in callers:
            t.join(timeout=120)
        assert not any(t.is_alive() for t in callers), "the callers deadlocked"
    finally:
        torch.set_num_threads(saved)
    assert not failures


def test_a_thread_limit_is_per_thread_and_restored() -> None:
    be = backend()
    if not be.native:
        assert be.limit_threads(1) == 0
        return
    previous = be.limit_threads(1)
    try:
        seen: list[int] = []
        other = threading.Thread(target=lambda: seen.append(be.limit_threads(0)))
        other.start()
        other.join()
        assert seen == [0]  # another thread has no limit
        assert be.limit_threads(2) == 1
    finally:
        be.limit_threads(previous)


def _product_on_threads(layer: SparseLinear, x: torch.Tensor, threads: int) -> torch.Tensor:
    """The layer's product straight through the kernels, on ``threads`` threads (no torch op
    that runs on torch's own threads, which a forked child must not use)."""
    m = x.shape[1]
    out = torch.empty(layer.out_features, m)
    offsets = (layer.indices.int() * m).contiguous()
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        backend().spmm(
            x, out, layer.values, offsets, layer.row_ptr, layer.bias, None, m, m, 0,
            -math.inf, math.inf,
        )  # fmt: skip
    finally:
        torch.set_num_threads(saved)
    return out


@needs_native
@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork on this platform")
def test_a_forked_child_starts_its_own_threads() -> None:
    """The parent has used the kernels' thread pool and the slice threads; a forked child,
    which has neither, starts its own. (torch sets a forked child to one thread: its own
    thread pool cannot be used there again, so the child keeps torch's ops on one thread.)"""
    sparse = to_sparse(_model())
    x = torch.randn(3, 3, 160, 160)
    expected = _on_threads(sparse, x, 2)  # both pools started
    torch.manual_seed(1)
    linear = to_sparse(_prune_linear(nn.Sequential(nn.Linear(256, 256)), 0.9)).net.get_submodule(
        "0"
    )
    assert isinstance(linear, SparseLinear)
    columns = torch.randn(256, 4096)  # (in_features, pixels): channel-major
    product = _product_on_threads(linear, columns, 2)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: compute, send, leave without running the parent's cleanup
        code = 1
        try:
            os.close(read_end)
            with torch.inference_mode():
                results = (
                    sparse(x),  # torch's one thread
                    _product_on_threads(linear, columns, 2),  # the kernels' pool
                    torch.stack(map_slices(lambda t: t * 2, list(x.unbind()), 2)),
                )
            buffer = io.BytesIO()
            torch.save(results, buffer)
            with os.fdopen(write_end, "wb") as pipe:
                pipe.write(buffer.getvalue())
            code = 0
        finally:
            os._exit(code)
    os.close(write_end)
    chunks = []
    try:
        with os.fdopen(read_end, "rb") as pipe:
            while True:
                ready, _, _ = select.select([pipe], [], [], 120)
                assert ready, "the forked child hung"
                chunk = pipe.read1(1 << 16)
                if not chunk:
                    break
                chunks.append(chunk)
    except BaseException:
        os.kill(pid, signal.SIGKILL)
        raise
    finally:
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    outputs, child_product, doubled = torch.load(io.BytesIO(b"".join(chunks)), weights_only=True)
    assert torch.equal(outputs, expected)
    assert torch.equal(child_product, product)
    assert torch.equal(doubled, x * 2)


@needs_native
def test_products_return_early_only_where_sparse_convs_read_the_output(monkeypatch) -> None:
    """A conv whose output only sparse convs read lets its product finish while Python moves
    on; the last conv (read by the pooling) and the stem do not. Outputs equal the one-thread
    ones, through the prepared calls and through the general path (which waits first)."""
    sparse = to_sparse(_model())
    early = {name for name, m in sparse.net.named_modules() if getattr(m, "returns_early", False)}
    assert "layer1.0.conv1" in early and "layer1.0.conv2" in early  # input and residual
    assert "conv1" in early  # read by layer1.0.conv1 and, as residual, by layer1.0.conv2
    assert "layer3.2.conv2" not in early  # read by the pooling
    x = torch.randn(2, 3, 64, 64)  # one slice: the layers split over the threads
    one = _on_threads(sparse, x, 1)
    assert torch.equal(_on_threads(sparse, x, 3), one)
    fresh = to_sparse(_model())
    # the general path right after products that returned early
    for name in ("layer2.0.conv2", "layer2.1.conv1"):
        monkeypatch.setattr(fresh.net.get_submodule(name), "_step", lambda x: None)
    assert torch.equal(_on_threads(fresh, x, 3), one)


@needs_native
def test_an_error_after_an_early_return_leaves_the_kernels_usable() -> None:
    sparse = to_sparse(_model())
    x = torch.randn(2, 3, 64, 64)
    expected = _on_threads(sparse, x, 1)

    def fail(module: nn.Module, args: tuple) -> None:
        raise ValueError("stop after an early return")

    handle = sparse.net.get_submodule("layer2.0.conv1").register_forward_pre_hook(fail)
    with pytest.raises(ValueError, match="stop after"):
        _on_threads(sparse, x, 2)
    handle.remove()
    results: list[torch.Tensor] = []
    other = threading.Thread(target=lambda: results.append(_on_threads(sparse, x, 2)))
    other.start()
    other.join(timeout=120)
    assert not other.is_alive(), "another thread's call waited forever"
    assert torch.equal(results[0], expected) and torch.equal(_on_threads(sparse, x, 2), expected)


@needs_native
@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="needs Linux's /proc")
def test_the_pool_threads_carry_the_library_name() -> None:
    """The kernels' worker threads are named, so that ``top -H`` or a debugger tells them from
    PyTorch's and onnxruntime's."""
    x = torch.randn(1, 3, 32, 32)  # at batch 1, a layer is split over the threads
    _on_threads(to_sparse(_model()), x, 2)
    names = set()
    for tid in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{tid}/comm") as f:
            names.add(f.read().strip())
    assert "strsparse" in names


def _far_mode(setting: int) -> int:
    return int(backend()._lib.ss_far_mode(setting))


@needs_native
def test_far_threads_run_small_jobs_alone_and_give_the_same_outputs() -> None:
    """Where the two threads run far apart (forced here), two-thread jobs run on the caller
    alone, two in 64 still going out to measure; the outputs do not change."""
    sparse = to_sparse(_model())
    x = torch.randn(1, 3, 32, 32)
    one = _on_threads(sparse, x, 1)
    lib = backend()._lib
    try:
        _far_mode(0)
        before = lib.ss_far_jobs()
        _on_threads(sparse, x, 2)
        assert lib.ss_far_jobs() == before  # near: nothing runs alone
        _far_mode(1)
        far = [_on_threads(sparse, x, 2) for _ in range(20)]
        assert lib.ss_far_jobs() >= before + 20  # far: the jobs were taken as such
    finally:
        _far_mode(-1)
    for out in far:
        torch.testing.assert_close(out, one, rtol=0, atol=1e-5)


@needs_native
def test_the_worker_measures_how_far_it_runs_from_the_caller() -> None:
    """Jobs that reach a spinning worker give the hand-off measure the pool goes by."""
    sparse = to_sparse(_model())
    x = torch.randn(1, 3, 32, 32)  # at batch 1 the layers are split over the threads
    _far_mode(0)  # every job goes out, so that every one can be measured
    try:
        for _ in range(30):
            _on_threads(sparse, x, 2)
        measure = _far_mode(-1)
    finally:
        _far_mode(-1)
    assert 0 < measure < 10_000_000  # nanoseconds
