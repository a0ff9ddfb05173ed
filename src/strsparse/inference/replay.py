"""A network's forward pass replayed in one native call.

At batch 1 a sparse ResNet-50 makes about 170 native calls of tens of microseconds each,
and the Python between them (the fx graph, module calls, ctypes) costs about a tenth of the
time; on two threads it is also the part that does not split. A network whose forward pass
is nothing but native calls, tensor allocations and views is therefore recorded once per
input shape and thread count:

- the kernels note every call the recording thread makes (``ss_record_begin``), and a
  ``TorchDispatchMode`` keeps every tensor allocated meanwhile (so that no two share an
  address) and refuses the recording if any other PyTorch op runs;
- each pointer argument is then resolved to the input, one of those allocations, or a
  constant the network's layers hold (weights, offsets, maps);
- the allocations are laid out in one arena, where a buffer reuses the bytes of one whose
  last call has run (a static memory plan), so that a replay touches as much memory as the
  eager pass does;
- ``ss_run_plan`` replays the calls, with the GIL released throughout.

The plan is checked once against the eager output before it is used; a network it cannot
replay runs as before, and so does one with a forward hook on any of its modules (a replay
would skip it). Plans are dropped when any sparse layer's state changes.
"""

from __future__ import annotations

import bisect
import ctypes
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules import module as _module_hooks
from torch.utils._python_dispatch import TorchDispatchMode

from strsparse.inference import layers
from strsparse.inference._native import backend

__all__ = ["Replayer"]

logger = logging.getLogger(__name__)

# opcode -> the native function it records (see kernels.c's OP_ enum)
_OPS = {
    1: "ss_spmm",
    2: "ss_spmm_mapped",
    3: "ss_spmm_windows",
    4: "ss_zero",
    5: "ss_pad_planes",
    6: "ss_subsample",
    7: "ss_compact",
    8: "ss_maxpool",
    9: "ss_plane_mean",
    10: "ss_depthwise",
    11: "ss_swap01",
    12: "ss_spmm_shifted",
    13: "ss_spmm_chunked",
}
_LITERAL, _INPUT, _ARENA = 0, 1, 2  # how ss_run_plan reads an argument
_ALIGN = 64  # bytes; what PyTorch's CPU allocator guarantees, so kernels see the same
_MAX_PLANS = 8  # input shapes (and thread counts) a replayer keeps plans for
# inputs larger than this (values) run layer by layer: a recording keeps every activation of
# the pass alive at once, and a pass this large spends next to nothing in Python anyway
_MAX_VALUES = 2**23
_ALLOCATIONS = {torch.ops.aten.empty.memory_format, torch.ops.aten.empty_strided.default}


class _Watch(TorchDispatchMode):
    """Keeps every tensor allocated while a forward pass is recorded, and names every op
    that is neither an allocation nor a view of its input."""

    def __init__(self) -> None:
        super().__init__()
        self.allocated: list[Tensor] = []
        self.foreign: list[str] = []

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        out = func(*args, **(kwargs or {}))
        if func in _ALLOCATIONS:
            self.allocated.append(out)
        elif not (func.is_view and _aliases(out, args)):
            self.foreign.append(str(func))
        return out


def _aliases(out: Any, args: tuple[Any, ...]) -> bool:
    """Whether ``out`` (a tensor or a sequence of them) shares the first tensor argument's
    memory: an op declared a view may still copy (``reshape`` of a strided tensor)."""
    base = next((a for a in args if isinstance(a, Tensor)), None)
    if base is None:
        return False
    outs = out if isinstance(out, (tuple, list)) else (out,)
    ptr = base.untyped_storage().data_ptr()
    return all(isinstance(o, Tensor) and o.untyped_storage().data_ptr() == ptr for o in outs)


def _tensors(obj: Any) -> Iterator[Tensor]:
    if isinstance(obj, Tensor):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for item in obj:
            yield from _tensors(item)


def _constants(net: nn.Module) -> Iterator[Tensor]:
    """The tensors a network's layers hold, which kernels may read: buffers, parameters and
    the sparse layers' cached offsets and output maps."""
    for m in net.modules():
        yield from (t for t in m._buffers.values() if t is not None)
        yield from (p for p in m._parameters.values() if p is not None)
        cache = getattr(m, "_offsets", None)
        if isinstance(cache, dict):
            yield from _tensors(list(cache.values()))


class _Ranges:
    """Address ranges of tensors' memory, to find which one a pointer points into."""

    def __init__(self, tensors: Iterable[Tensor]) -> None:
        spans = {}
        for t in tensors:
            storage = t.untyped_storage()
            if storage.nbytes() > 0:
                spans[storage.data_ptr()] = (storage.nbytes(), t)
        self.starts = sorted(spans)
        self.spans = spans

    def find(self, address: int) -> tuple[int, int] | None:
        """``(start, size)`` of the range holding ``address``."""
        i = bisect.bisect_right(self.starts, address) - 1
        if i < 0:
            return None
        start = self.starts[i]
        size = self.spans[start][0]
        return (start, size) if address < start + size else None


def _layout(spans: dict[int, tuple[int, int, int]]) -> tuple[dict[int, int], int]:
    """Arena offsets for buffers ``{start: (size, first_call, last_call)}``: each at the
    lowest aligned offset clear of every buffer whose calls overlap its own. Returns the
    offsets and the arena's size in bytes."""
    placed: list[tuple[int, int, int, int]] = []  # (offset, size, first, last)
    offsets = {}
    order = sorted(spans, key=lambda s: (-spans[s][0], s))
    for start in order:
        size, first, last = spans[start]
        size = -(-size // _ALIGN) * _ALIGN
        offset = 0
        for o, s, _, _ in sorted(p for p in placed if p[2] <= last and first <= p[3]):
            if offset + size <= o:
                break
            offset = max(offset, o + s)
        placed.append((offset, size, first, last))
        offsets[start] = offset
    return offsets, max((o + s for o, s, _, _ in placed), default=0)


@dataclass
class _Plan:
    words: Tensor  # int64: [op, n, (kind, value) * n] per call, for ss_run_plan
    arena_bytes: int
    out_offset: int  # in floats, into the arena
    out_size: tuple[int, ...]
    out_stride: tuple[int, ...]
    generation: int
    keep: list[Tensor]  # the constants the calls read, alive while the plan is
    arenas: list[Tensor] = field(default_factory=list)  # free arenas; one per running call

    def __repr__(self) -> str:
        return f"_Plan({self.words.numel()} words, {self.arena_bytes} arena bytes)"

    def run(self, x: Tensor) -> Tensor:
        arena = self.arenas.pop() if self.arenas else torch.empty(self.arena_bytes // 4 + 1)
        try:
            failed = backend()._lib.ss_run_plan(  # type: ignore[union-attr]
                self.words.data_ptr(), self.words.numel(), x.data_ptr(), arena.data_ptr()
            )
            if failed:
                raise RuntimeError("strsparse: a recorded forward pass could not be replayed")
            return arena.as_strided(self.out_size, self.out_stride, self.out_offset).clone()
        finally:
            self.arenas.append(arena)


class _Refused(Exception):
    """Why a forward pass cannot be replayed."""


def _record(fn: Callable[[Tensor], Any], x: Tensor) -> tuple[Any, Tensor, _Watch]:
    """Run ``fn(x)`` recording its native calls: (output, the calls' words, the watch)."""
    lib = backend()._lib
    assert lib is not None
    watch = _Watch()
    lib.ss_record_begin()
    try:
        with watch:
            out = fn(x)
    finally:
        count = lib.ss_record_end()
        words = torch.empty(max(count, 0), dtype=torch.int64)
        lib.ss_record_take(words.data_ptr() if count > 0 else None)
    if count < 0:
        raise _Refused("the recording ran out of memory")
    return out, words, watch


def _pointer_args(lib: Any) -> dict[int, set[int]]:
    return {
        op: {i for i, t in enumerate(getattr(lib, name).argtypes) if t is ctypes.c_void_p}
        for op, name in _OPS.items()
    }


def _build(net: nn.Module, fn: Callable[[Tensor], Any], x: Tensor) -> tuple[Any, _Plan]:
    """Record ``fn(x)`` and make its plan; returns the eager output too. Raises ``_Refused``."""
    generation = layers.state_generation()
    out, words, watch = _record(fn, x)
    if watch.foreign:
        raise _Refused(f"PyTorch ops run between the kernels: {sorted(set(watch.foreign))[:4]}")
    if not isinstance(out, Tensor) or out.dtype != torch.float32:
        raise _Refused("the output is not one float32 tensor")
    if words.numel() == 0:
        raise _Refused("no native calls")
    lib = backend()._lib
    pointers = _pointer_args(lib)
    buffers = _Ranges(watch.allocated)
    constants = _Ranges(_constants(net))
    x_start, x_end = x.data_ptr(), x.data_ptr() + x.numel() * x.element_size()
    calls: list[tuple[int, list[tuple[int, int]]]] = []
    uses: dict[int, list[int]] = {}  # buffer start -> [first call, last call]
    keep: dict[int, Tensor] = {}
    raw = words.tolist()
    i = 0
    while i < len(raw):
        op, n = raw[i], raw[i + 1]
        args = raw[i + 2 : i + 2 + n]
        i += 2 + n
        if op not in pointers:
            raise _Refused(f"unknown native call {op}")
        resolved = []
        for k, value in enumerate(args):
            if k not in pointers[op] or value == 0:
                resolved.append((_LITERAL, value))
            elif x_start <= value < x_end:
                resolved.append((_INPUT, value - x_start))
            elif (hit := buffers.find(value)) is not None:
                span = uses.setdefault(hit[0], [len(calls), len(calls)])
                span[1] = len(calls)
                resolved.append((-hit[0], value - hit[0]))  # relocated below
            elif (hit := constants.find(value)) is not None:
                keep[hit[0]] = constants.spans[hit[0]][1]
                resolved.append((_LITERAL, value))
            else:
                raise _Refused("a native call reads memory that no layer holds")
        calls.append((op, resolved))
    out_start = out.untyped_storage().data_ptr()
    if out_start not in uses:
        raise _Refused("the output is not written by a native call")
    uses[out_start][1] = len(calls)
    # one call of slack: a product that returned early runs on while the next call starts
    spans = {s: (buffers.spans[s][0], f, last + 1) for s, (f, last) in uses.items()}
    offsets, arena_bytes = _layout(spans)
    flat: list[int] = []
    for op, resolved in calls:
        flat += [op, len(resolved)]
        for kind, value in resolved:
            if kind < 0:  # (-buffer start, offset in it)
                flat += [_ARENA, offsets[-kind] + value]
            else:
                flat += [kind, value]
    plan = _Plan(
        words=torch.tensor(flat, dtype=torch.int64),
        arena_bytes=arena_bytes,
        out_offset=offsets[out_start] // 4 + int(out.storage_offset()),
        out_size=tuple(out.shape),
        out_stride=tuple(out.stride()),
        generation=generation,
        keep=list(keep.values()),
    )
    replayed = plan.run(x)
    if not torch.equal(replayed, out):
        raise _Refused("the replay does not reproduce the eager output")
    return out, plan


_MISSING = object()


class Replayer:
    """``suffix(fn(prefix(x)))``, where ``fn`` (a part of a network that runs only native
    calls) replays its calls in one call once it has run a shape twice (the first run fills
    the layers' caches, the second is recorded); ``prefix`` and ``suffix`` (optional: the ops
    around it, such as a first conv or a classifier kept dense) run as they are, and shapes
    ``fn`` cannot replay keep running ``fn``."""

    def __init__(
        self,
        net: nn.Module,
        fn: Callable[[Tensor], Any],
        prefix: Callable[[Tensor], Any] | None = None,
        suffix: Callable[[Any], Any] | None = None,
    ) -> None:
        self.net = net
        self.fn = fn
        self.prefix = prefix
        self.suffix = suffix
        self.enabled = True
        self._reset()

    def _hooked(self) -> bool:
        """Whether a forward hook would see a module of ``fn`` run: a replay runs none, so
        then the pass runs layer by layer, as the user who set the hook expects."""
        if _module_hooks._global_forward_hooks or _module_hooks._global_forward_pre_hooks:
            return True
        return any(m._forward_hooks or m._forward_pre_hooks for m in self._modules)

    def _reset(self) -> None:
        # key -> the plan, None (refused), or _MISSING (seen once)
        self._plans: OrderedDict[tuple[Any, ...], Any] = OrderedDict()
        self._lock = threading.Lock()
        fn = self.fn
        self._modules = list(fn.modules()) if isinstance(fn, nn.Module) else []

    def __getstate__(self) -> dict[str, Any]:
        keys = ("net", "fn", "prefix", "suffix", "enabled")
        return {k: self.__dict__[k] for k in keys}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._reset()

    def clear(self) -> None:
        """Drop every plan (a layer's state changed)."""
        with self._lock:
            self._plans.clear()

    def __call__(self, x: Tensor) -> Any:
        if self.prefix is not None:
            x = self.prefix(x)
        out = self._middle(x)
        return out if self.suffix is None else self.suffix(out)

    def _middle(self, x: Tensor) -> Any:
        if (
            not self.enabled
            or self._hooked()
            or not isinstance(x, Tensor)
            or x.numel() > _MAX_VALUES
            or x.dtype != torch.float32
            or x.device.type != "cpu"
            or not x.is_contiguous()
            or (x.requires_grad and torch.is_grad_enabled())
            or not backend().native
        ):
            return self.fn(x)
        key = (tuple(x.shape), torch.get_num_threads())
        plan = self._plans.get(key, _MISSING)
        if isinstance(plan, _Plan):
            if plan.generation == layers.state_generation():
                return plan.run(x)
            plan = _MISSING
            self.clear()
        if plan is None or not self._lock.acquire(blocking=False):
            return self.fn(x)
        try:
            if key not in self._plans:  # first run: the layers fill their caches
                self._remember(key, _MISSING)
                return self.fn(x)
            try:
                out, built = _build(self.net, self.fn, x)
            except _Refused as exc:
                logger.info("strsparse: %s runs eagerly at input %s: %s", self._name(), key, exc)
                self._remember(key, None)
                return self.fn(x)
            self._remember(key, built)
            return out
        finally:
            self._lock.release()

    def _remember(self, key: tuple[Any, ...], value: Any) -> None:
        self._plans[key] = value
        self._plans.move_to_end(key)
        while len(self._plans) > _MAX_PLANS:
            self._plans.popitem(last=False)

    def _name(self) -> str:
        return type(self.net).__name__

    def plan_for(self, shape: tuple[int, ...], threads: int | None = None) -> bool | None:
        """Whether inputs of ``shape`` to the replayed part (after ``prefix``) replay
        (``True``), run eagerly (``False``), or have not been tried yet (``None``): for tests
        and benchmarks."""
        key = (tuple(shape), torch.get_num_threads() if threads is None else threads)
        plan = self._plans.get(key, _MISSING)
        return None if plan is _MISSING else plan is not None
