"""Ember's Triton kernels for the CUDA backend.

These modules import only ``triton`` (no torch, no ember), so the ahead-of-time compiler can
load them in a clean child process. `KERNELS` names every kernel the backend launches; the
torch-facing launchers that pick block sizes and grids live in ``ember.backends.cuda.ops``.
"""

from __future__ import annotations

from .attention import flash_attention_kernel
from .epilogue import ACT_CODES
from .gemm_int4 import woq_gemm_kernel, woq_gemv_kernel
from .gemm_int8 import quantize_rows_kernel, w8a8_gemm_kernel
from .norm import add_norm_kernel
from .sparse import bitmap_gemm_kernel, nm_gemm_kernel
from .tokens import gather_rows_kernel, pool_scatter_kernel

__all__ = ["KERNELS", "ACT_CODES"]

# kernel name -> the triton.jit function (an InterpretedFunction under TRITON_INTERPRET=1)
KERNELS = {
    "quantize_rows_kernel": quantize_rows_kernel,
    "w8a8_gemm_kernel": w8a8_gemm_kernel,
    "woq_gemm_kernel": woq_gemm_kernel,
    "woq_gemv_kernel": woq_gemv_kernel,
    "nm_gemm_kernel": nm_gemm_kernel,
    "bitmap_gemm_kernel": bitmap_gemm_kernel,
    "gather_rows_kernel": gather_rows_kernel,
    "pool_scatter_kernel": pool_scatter_kernel,
    "add_norm_kernel": add_norm_kernel,
    "flash_attention_kernel": flash_attention_kernel,
}
