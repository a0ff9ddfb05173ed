"""Loading the native kernels, with fallbacks.

The kernels (``csrc/kernels.c``) are built by the package's own install (``pip install .``
or ``pip install -e .``) into the extension ``strsparse.inference._kernels`` and called
through ctypes. Where that library is missing (sources run from a checkout without a build),
the same C file is compiled once with the system C compiler into a per-user cache. Where no
library can be had, the sparse product runs through numba if it is installed, and otherwise
``to_sparse`` keeps every layer dense; each fallback warns once.

``STRSPARSE_ISA`` (``avx512``, ``avx2``, ``portable``) pins the instruction set the kernels
use; by default the best one the CPU supports is picked at run time.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.util
import logging
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import warnings
from pathlib import Path

import torch
from torch import Tensor

from strsparse.errors import OptionError

__all__ = ["ISA_NAMES", "Backend", "backend", "set_isa", "set_window_copy"]

logger = logging.getLogger(__name__)

ISA_NAMES = ("portable", "avx2", "avx512")
_SOURCE = Path(__file__).with_name("csrc") / "kernels.c"
_INF = float("inf")

_i64 = ctypes.c_int64
_ptr = ctypes.c_void_p
_f32 = ctypes.c_float
_int = ctypes.c_int


def _ptr_of(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


class Backend:
    """The sparse product and layout helpers, native (ctypes) or numba."""

    def __init__(self, name: str, lib: ctypes.CDLL | None = None) -> None:
        self.name = name  # "native", "numba" or "none"
        self._lib = lib
        if lib is not None:
            lib.ss_spmm.argtypes = [_ptr] * 7 + [_i64] * 4 + [_f32, _f32, _int]
            lib.ss_spmm.restype = None
            lib.ss_spmm_chunked.argtypes = lib.ss_spmm.argtypes + [_i64]
            lib.ss_spmm_chunked.restype = None
            lib.ss_spmm_mapped.argtypes = [_ptr] * 7 + [_i64] * 4 + [_f32, _f32, _int, _ptr]
            lib.ss_spmm_mapped.restype = _int
            lib.ss_spmm_windows.argtypes = lib.ss_spmm_mapped.argtypes + [_ptr, _ptr, _i64]
            lib.ss_spmm_windows.restype = _int
            lib.ss_spmm_shifted.argtypes = lib.ss_spmm_mapped.argtypes + [_ptr, _ptr] + [_i64] * 3
            lib.ss_spmm_shifted.restype = _int
            lib.ss_set_large.argtypes = [_int]
            lib.ss_set_large.restype = _int
            lib.ss_set_window_copy.argtypes = [_int]
            lib.ss_set_window_copy.restype = _int
            lib.ss_far_mode.argtypes = [_int]
            lib.ss_far_mode.restype = _i64
            lib.ss_far_jobs.restype = _i64
            lib.ss_pad_planes.argtypes = [_ptr, _ptr] + [_i64] * 10 + [_int]
            lib.ss_pad_planes.restype = None
            lib.ss_compact.argtypes = [_ptr] * 3 + [_i64] * 7 + [_f32, _f32, _int]
            lib.ss_compact.restype = None
            lib.ss_subsample.argtypes = [_ptr, _ptr] + [_i64] * 7 + [_int]
            lib.ss_subsample.restype = None
            lib.ss_maxpool.argtypes = [_ptr, _ptr] + [_i64] * 9 + [_int]
            lib.ss_maxpool.restype = None
            lib.ss_depthwise.argtypes = [_ptr] * 6 + [_i64] * 11 + [_f32, _f32, _int]
            lib.ss_depthwise.restype = None
            lib.ss_isa.restype = _int
            lib.ss_plane_mean.argtypes = [_ptr, _ptr, _i64, _i64, _int]
            lib.ss_plane_mean.restype = None
            lib.ss_zero.argtypes = [_ptr, _i64, _int]
            lib.ss_zero.restype = None
            lib.ss_sync.argtypes = []
            lib.ss_sync.restype = None
            lib.ss_set_thread_limit.argtypes = [_int]
            lib.ss_set_thread_limit.restype = _int
            lib.ss_set_isa.argtypes = [_int]
            lib.ss_set_isa.restype = _int
            lib.ss_swap01.argtypes = [_ptr, _ptr, _i64, _i64, _i64, _int]
            lib.ss_swap01.restype = None
            lib.ss_record_begin.argtypes = []
            lib.ss_record_begin.restype = None
            lib.ss_record_end.argtypes = []
            lib.ss_record_end.restype = _i64
            lib.ss_record_take.argtypes = [_ptr]
            lib.ss_record_take.restype = None
            lib.ss_run_plan.argtypes = [_ptr, _i64, _ptr, _ptr]
            lib.ss_run_plan.restype = _int
            isa = os.environ.get("STRSPARSE_ISA")
            if isa:
                set_isa(isa, lib)

    @property
    def available(self) -> bool:
        return self.name != "none"

    @property
    def native(self) -> bool:
        return self._lib is not None

    @property
    def isa(self) -> str:
        """The instruction set the native kernels use (``numba`` / ``none`` otherwise)."""
        return ISA_NAMES[self._lib.ss_isa()] if self._lib is not None else self.name

    def limit_threads(self, threads: int) -> int:
        """Let the native calls made from the calling thread use at most ``threads`` threads
        (0: as many as they are given); returns the previous limit. Threads that run beside
        each other on their own work keep to one each this way."""
        return self._lib.ss_set_thread_limit(threads) if self._lib is not None else 0

    def sync(self) -> None:
        """Finish the product this thread let return early (see ``SparseConv2d.returns_early``)
        before anything but the kernels reads its output."""
        if self._lib is not None:
            self._lib.ss_sync()

    def zeros(self, count: int) -> Tensor:
        """A flat float32 tensor of ``count`` zeros, written by the kernels' own threads."""
        if self._lib is None:
            return torch.zeros(count)
        out = torch.empty(count)
        self._lib.ss_zero(out.data_ptr(), count, torch.get_num_threads())
        return out

    def spmm(
        self,
        inp: Tensor,
        out: Tensor,
        values: Tensor,
        offsets: Tensor,
        row_ptr: Tensor,
        bias: Tensor | None,
        residual: Tensor | None,
        n_pix: int,
        ld_out: int,
        ld_res: int,
        lo: float,
        hi: float,
        out_map: Tensor | None = None,
        windows: tuple[Tensor, Tensor] | None = None,
        shifted: tuple[Tensor, Tensor, int, int] | None = None,
        chunks: int = 0,
    ) -> None:
        """``out[co*ld_out + p] = clamp(bias[co] + sum_j values[j] * inp[offsets[j] + p]
        (+ residual[co*ld_res + p]), lo, hi)`` for ``p < n_pix``; all float32 / int32,
        contiguous, flat indexing. With ``out_map`` (int64, native kernels only), pixel ``p``
        is written where the map sends it instead (see ``ss_spmm_mapped``); ``windows``, the
        distinct offsets and each nonzero's index among them (int32, see
        ``ss_spmm_windows``), lets the product copy each window once per tile. ``shifted``,
        each nonzero's tap, the taps' (dy, dx) (int32) and the image's height and width
        (native kernels only, see ``ss_spmm_shifted``), reads ``inp`` unpadded, each nonzero
        only where its tap lands inside the image. ``chunks`` (native kernels only, see
        ``ss_spmm_chunked``): the nonzeros come in that many runs by input column, and
        ``row_ptr`` holds a row pointer of ``c_out + 1`` entries for each."""
        c_out = row_ptr.numel() // max(1, chunks) - 1
        if self._lib is not None:
            args = (
                inp.data_ptr(),
                out.data_ptr(),
                values.data_ptr(),
                offsets.data_ptr(),
                row_ptr.data_ptr(),
                _ptr_of(bias),
                _ptr_of(residual),
                c_out,
                n_pix,
                ld_out,
                ld_res,
                lo,
                hi,
                torch.get_num_threads(),
            )
            if shifted is not None:
                taps, shifts, h, w = shifted
                failed = self._lib.ss_spmm_shifted(
                    *args, _ptr_of(out_map), taps.data_ptr(), shifts.data_ptr(), shifts.shape[0],
                    h, w,
                )  # fmt: skip
                if failed:
                    raise ValueError(f"the shifted product cannot handle {shifts.shape[0]} taps")
                return
            if chunks:
                self._lib.ss_spmm_chunked(*args, chunks)
                return
            if windows is not None:
                distinct, slots = windows
                failed = self._lib.ss_spmm_windows(
                    *args, _ptr_of(out_map), distinct.data_ptr(), slots.data_ptr(),
                    distinct.numel(),
                )  # fmt: skip
            elif out_map is None:
                self._lib.ss_spmm(*args)
                return
            else:
                failed = self._lib.ss_spmm_mapped(*args, out_map.data_ptr())
            if failed:
                assert out_map is not None
                raise ValueError(f"the native output map cannot handle {out_map.tolist()}")
            return
        if out_map is not None or shifted is not None or chunks:
            raise RuntimeError("mapped, shifted and chunked products need the native kernels")
        from strsparse.inference import _numba_kernels

        _numba_kernels.spmm(
            inp.view(-1).numpy(),
            out.view(-1).numpy(),
            values.numpy(),
            offsets.numpy(),
            row_ptr.numpy(),
            (bias if bias is not None else torch.zeros(c_out)).numpy(),
            (residual.view(-1) if residual is not None else torch.zeros(0)).numpy(),
            residual is not None,
            n_pix,
            ld_out,
            ld_res,
            lo,
            hi,
        )

    def swap01(self, x: Tensor) -> Tensor:
        """``x.transpose(0, 1).contiguous()`` of a contiguous float32 ``x`` of 2 or more
        dimensions (the standard <-> channel-major layouts, a Linear layer's (M, K) <-> (K,
        M)); natively where possible."""
        a, b = x.shape[0], x.shape[1]
        if self._lib is None or a == 1 or b == 1:
            return x.transpose(0, 1).contiguous()
        out = torch.empty((b, a, *x.shape[2:]))
        self._lib.ss_swap01(
            x.data_ptr(), out.data_ptr(), a, b, x[0, 0].numel(), torch.get_num_threads()
        )
        return out

    def pad_planes(
        self, x: Tensor, pad: tuple[int, int], stride: int, hq: int, wq: int, ch_stride: int
    ) -> Tensor:
        """Zero-pad channel-major ``x`` (C, N, H, W) and split it into ``stride**2`` parity
        planes (see ``ss_pad_planes``): a flat tensor of ``C * ch_stride`` floats."""
        c, n, h, w = x.shape
        out = torch.empty(c * ch_stride)
        if self._lib is not None:
            self._lib.ss_pad_planes(
                x.data_ptr(),
                out.data_ptr(),
                c,
                n,
                h,
                w,
                pad[0],
                pad[1],
                stride,
                hq,
                wq,
                ch_stride,
                torch.get_num_threads(),
            )
            return out
        s = stride
        padded = x.new_zeros(c, n, s * hq, s * wq)
        rows, cols = min(h, s * hq - pad[0]), min(w, s * wq - pad[1])
        padded[:, :, pad[0] : pad[0] + rows, pad[1] : pad[1] + cols] = x[:, :, :rows, :cols]
        planes = padded.view(c, n, hq, s, wq, s).permute(0, 3, 5, 1, 2, 4)  # (C, a, b, N, i, j)
        out.view(c, ch_stride)[:, : s * s * n * hq * wq] = planes.reshape(c, -1)
        return out

    def subsample(self, x: Tensor, stride: int) -> Tensor:
        """``x[:, :, ::stride, ::stride]`` of channel-major ``x`` (C, N, H, W), contiguous."""
        if self._lib is None:
            return x[:, :, ::stride, ::stride].contiguous()
        c, n, h, w = x.shape
        ho, wo = -(-h // stride), -(-w // stride)
        out = torch.empty(c, n, ho, wo)
        self._lib.ss_subsample(
            x.data_ptr(), out.data_ptr(), c, n, h, w, stride, ho, wo, torch.get_num_threads()
        )
        return out

    def compact(
        self,
        y: Tensor,
        shape: tuple[int, int, int, int],
        hq: int,
        wq: int,
        ld_in: int,
        residual: Tensor | None,
        lo: float,
        hi: float,
    ) -> Tensor:
        """(C, N, Ho, Wo) from a shifted-window output ``y`` whose channel ``c`` holds pixel
        (n, i, j) at ``c*ld_in + (n*hq + i)*wq + j``; with ``residual``, clamp(y + residual)."""
        c, n, ho, wo = shape
        if self._lib is not None:
            out = torch.empty(shape)
            self._lib.ss_compact(
                y.data_ptr(),
                out.data_ptr(),
                _ptr_of(residual),
                c,
                n,
                hq,
                wq,
                ho,
                wo,
                ld_in,
                lo,
                hi,
                torch.get_num_threads(),
            )
            return out
        full = torch.nn.functional.pad(y, (0, c * ld_in - y.numel()))
        view = full.view(c, ld_in)[:, : n * hq * wq].view(c, n, hq, wq)[:, :, :ho, :wo]
        if residual is None:
            return view.contiguous()
        return (view + residual).clamp_(lo, hi)

    def depthwise(
        self,
        x: Tensor,
        values: Tensor,
        taps: Tensor,
        row_ptr: Tensor,
        bias: Tensor | None,
        pad: tuple[int, int],
        stride: int,
        hq: int,
        wq: int,
        ho: int,
        wo: int,
        lo: float,
        hi: float,
    ) -> Tensor | None:
        """Depthwise convolution of channel-major ``x`` (C, N, H, W) into (C, N, ho, wo)
        (see ``ss_depthwise``: ``taps`` are the nonzeros' offsets in a plane padded and split
        into parity planes of ``hq x wq``); ``None`` without native code."""
        if self._lib is None:
            return None
        c, n, h, w = x.shape
        out = torch.empty(c, n, ho, wo)
        self._lib.ss_depthwise(
            x.data_ptr(),
            out.data_ptr(),
            values.data_ptr(),
            taps.data_ptr(),
            row_ptr.data_ptr(),
            _ptr_of(bias),
            c,
            n,
            h,
            w,
            pad[0],
            pad[1],
            stride,
            hq,
            wq,
            ho,
            wo,
            lo,
            hi,
            torch.get_num_threads(),
        )
        return out

    def plane_mean(self, x: Tensor) -> Tensor | None:
        """The mean of every (H, W) plane of a contiguous 4-D ``x``, shaped ``(A, B, 1, 1)``;
        ``None`` without native code."""
        if self._lib is None:
            return None
        a, b, h, w = x.shape
        out = torch.empty(a, b, 1, 1)
        self._lib.ss_plane_mean(x.data_ptr(), out.data_ptr(), a * b, h * w, torch.get_num_threads())
        return out

    def maxpool(self, x: Tensor, kernel: int, stride: int, padding: int) -> Tensor | None:
        """Max pooling of channel-major ``x`` (C, N, H, W); ``None`` without native code."""
        if self._lib is None:
            return None
        c, n, h, w = x.shape
        ho = (h + 2 * padding - kernel) // stride + 1
        wo = (w + 2 * padding - kernel) // stride + 1
        out = torch.empty(c, n, ho, wo)
        self._lib.ss_maxpool(
            x.data_ptr(),
            out.data_ptr(),
            c * n,
            h,
            w,
            kernel,
            kernel,
            stride,
            padding,
            ho,
            wo,
            torch.get_num_threads(),
        )
        return out


def set_isa(name: str, lib: ctypes.CDLL | None = None) -> str:
    """Pin the native kernels' instruction set (``avx512``, ``avx2``, ``portable`` or
    ``auto``); returns the one in use. Raises ``ValueError`` if the CPU lacks it."""
    lib = lib if lib is not None else backend()._lib
    if lib is None:
        raise RuntimeError(f"the native kernels are not loaded ({backend().name}); no ISA to set")
    key = name.strip().lower()
    if key == "auto":
        return ISA_NAMES[lib.ss_set_isa(-1)]
    if key not in ISA_NAMES:
        raise OptionError(f"unknown instruction set {name!r}; choose one of auto, {ISA_NAMES}")
    if lib.ss_set_isa(ISA_NAMES.index(key)) < 0:
        raise OptionError(f"this CPU does not support {name!r}; choose one of auto, portable")
    return key


def set_window_copy(mode: str) -> str:
    """Whether a k x k conv's product copies each distinct input window once per tile into an
    aligned buffer: ``auto`` (where it pays: windows reused by many nonzeros that fit in the
    L1 cache), ``on`` (wherever the windows are known) or ``off``. Returns the mode."""
    return _set_mode("window copy", mode, "ss_set_window_copy")


def set_large_tensors(mode: str) -> str:
    """How products over large tensors (8 MB and more) run: ``auto`` (by size), ``on`` (as if
    every tensor were large) or ``off``. A large product writes its output with non-temporal
    stores and prefetches each next tile's inputs. Returns the mode."""
    return _set_mode("large-tensor", mode, "ss_set_large")


def _set_mode(what: str, mode: str, setter: str) -> str:
    """Pass ``auto`` / ``off`` / ``on`` to the native setter as -1 / 0 / 1."""
    lib = backend()._lib
    if lib is None:
        raise RuntimeError(f"the native kernels are not loaded ({backend().name})")
    modes = {"auto": -1, "off": 0, "on": 1}
    key = mode.strip().lower()
    if key not in modes:
        raise OptionError(f"unknown {what} mode {mode!r}; choose one of {tuple(modes)}")
    getattr(lib, setter)(modes[key])
    return key


def _built_library() -> Path | None:
    """The extension built by the package's install, if any."""
    try:
        spec = importlib.util.find_spec("strsparse.inference._kernels")
    except (ImportError, ValueError):
        return None
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin)


def _source_hash() -> str:
    """What ``setup.py`` stamps into the library: the first 16 hex digits of the source's
    SHA-256."""
    return hashlib.sha256(_SOURCE.read_bytes()).hexdigest()[:16]


def _open(path: Path) -> ctypes.CDLL | None:
    """The library at ``path`` if it was built from the current source, else ``None``."""
    lib = ctypes.CDLL(str(path))
    try:
        lib.ss_source_hash.restype = ctypes.c_char_p
        stamp = lib.ss_source_hash().decode()
    except AttributeError:
        stamp = ""
    if stamp != _source_hash():
        logger.info("ignoring %s: built from another version of kernels.c", path)
        return None
    return lib


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "strsparse"


def _compile_cached() -> Path | None:
    """Compile ``kernels.c`` with the system C compiler into the user cache (once per source
    version); ``None`` if there is no compiler or the build fails."""
    digest = _source_hash()
    target = _cache_dir() / f"kernels-{digest}-{sys.platform}.so"
    if target.is_file():
        return target
    compiler = os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc"
    compiler = compiler.split()[0]
    if shutil.which(compiler) is None:
        compiler = shutil.which("cc") or shutil.which("gcc") or ""
        if not compiler:
            return None
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / target.name
        cmd = [compiler, "-O3", "-std=c11", "-shared", "-fPIC", "-pthread", "-DSS_NO_PYTHON"]
        cmd += [f'-DSS_SOURCE_HASH="{digest}"']
        cmd += [str(_SOURCE), "-o", str(out)]
        try:
            subprocess.run(cmd, check=True, capture_output=True, timeout=120)
        except (OSError, subprocess.SubprocessError) as exc:
            logger.info("compiling the sparse kernels failed: %s", exc)
            return None
        os.replace(out, target)
    return target


def _load() -> Backend:
    if os.environ.get("STRSPARSE_NATIVE", "1") == "0":
        candidates: list[Path | None] = []
    else:
        candidates = [_built_library()]
    errors = []
    for path in candidates:
        if path is None:
            continue
        try:
            lib = _open(path)
            if lib is not None:
                return Backend("native", lib)
        except OSError as exc:
            errors.append(f"{path}: {exc}")
    if candidates:
        try:
            path = _compile_cached()
            lib = None if path is None else _open(path)
            if lib is not None:
                return Backend("native", lib)
            errors.append("no C compiler to build them")
        except OSError as exc:
            errors.append(str(exc))
    reason = "; ".join(errors) or "disabled by STRSPARSE_NATIVE=0"
    if importlib.util.find_spec("numba") is not None:
        warnings.warn(
            f"strsparse's native sparse kernels could not be loaded ({reason}); using numba, "
            "which is several times slower. Reinstall strsparse with a C compiler present "
            "(pip install -e .) for the native kernels.",
            RuntimeWarning,
            stacklevel=3,
        )
        return Backend("numba")
    warnings.warn(
        f"strsparse's native sparse kernels could not be loaded ({reason}) and numba is not "
        "installed: to_sparse keeps every layer dense. Reinstall strsparse with a C compiler "
        "present (pip install -e .), or pip install numba.",
        RuntimeWarning,
        stacklevel=3,
    )
    return Backend("none")


_BACKEND: Backend | None = None


def backend() -> Backend:
    """The backend in use (loaded on first call)."""
    global _BACKEND
    if _BACKEND is None:
        _BACKEND = _load()
    return _BACKEND
