"""The sparse product in numba: the fallback where the native kernels cannot be loaded.

Same contract as ``ss_spmm`` in ``csrc/kernels.c``; parallel over output channels.
"""

from __future__ import annotations

import numba
import numpy as np

__all__ = ["spmm"]


@numba.njit(parallel=True, fastmath=True, cache=True)
def spmm(
    inp, out, values, offsets, row_ptr, bias, residual, has_residual, n_pix, ld_out, ld_res, lo, hi
):
    c_out = row_ptr.shape[0] - 1
    for co in numba.prange(c_out):
        acc = np.empty(n_pix, np.float32)
        for p in range(n_pix):
            acc[p] = bias[co]
        for j in range(row_ptr[co], row_ptr[co + 1]):
            w = values[j]
            base = offsets[j]
            for p in range(n_pix):
                acc[p] += w * inp[base + p]
        for p in range(n_pix):
            v = acc[p]
            if has_residual:
                v += residual[co * ld_res + p]
            out[co * ld_out + p] = min(max(v, lo), hi)
