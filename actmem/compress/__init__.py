"""actmem.compress: tensors in, packed tensors out; knows nothing of training.

Every function dispatches on the tensor: Triton kernels on CUDA, the vectorised torch reference
elsewhere; `ACTMEM_BACKEND=reference|triton` forces one (see backend.py). Arguments it cannot take
raise CompressError, a ValueError of its own (errors.py); NaN/Inf input raises NonFiniteError, one of those.
"""
from actmem.compress import grid, index, split  # noqa: F401  (their layouts register on import)
from actmem.compress.errors import CompressError, NonFiniteError
from actmem.compress.packed import Packed, decode, register_layout
from actmem.compress.packing import pack_codes, packed_numel, unpack_codes
from actmem.compress.quant import WIDTHS, dequantize, quantize

__all__ = ["CompressError", "NonFiniteError", "Packed", "WIDTHS", "decode", "dequantize", "pack_codes", "packed_numel",
           "quantize", "register_layout", "unpack_codes"]
