"""Write a safetensors file one tensor at a time, so no more than one tensor (one layer)
is in memory. safetensors' own `save_file` takes the whole dict at once.

The format: an 8-byte little-endian header length, the JSON header
`{"__metadata__": {str: str}, name: {"dtype", "shape", "data_offsets": [begin, end]}}`
padded with spaces to a multiple of 8, then the tensors' bytes back to back. The header
needs every dtype and shape first: the caller plans them, then yields tensors in that order.
"""

from __future__ import annotations

import json
import math
import struct
from typing import BinaryIO, Iterable

import torch

from calibration.checkpoint import TensorInfo
from calibration.safetensors_header import DTYPE_BYTES

DTYPE_NAMES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}  # fmt: skip


def tensor_bytes(info: TensorInfo) -> int:
    return math.prod(info.shape) * DTYPE_BYTES[info.dtype]


def header_bytes(plan: dict[str, TensorInfo], metadata: dict[str, str]) -> bytes:
    """The length prefix and JSON header for tensors laid out in `plan` order."""
    header: dict = {"__metadata__": metadata}
    offset = 0
    for name, info in plan.items():
        size = tensor_bytes(info)
        header[name] = {"dtype": info.dtype, "shape": list(info.shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # keeps the data 8-byte aligned for mmap readers
    return struct.pack("<Q", len(text)) + text


def write_stream(
    out: BinaryIO,
    plan: dict[str, TensorInfo],
    tensors: Iterable[tuple[str, torch.Tensor]],
    metadata: dict[str, str],
) -> int:
    """Write the planned tensors as they come; returns the bytes written.

    `tensors` must yield exactly the plan's names, in its order, with its dtypes and shapes.
    """
    written = out.write(header_bytes(plan, metadata))
    expected = iter(plan.items())
    for name, t in tensors:
        want_name, want = next(expected, (None, None))
        got = TensorInfo(DTYPE_NAMES.get(t.dtype, str(t.dtype)), tuple(t.shape))
        if name != want_name or got != want:
            raise RuntimeError(f"tensor stream out of plan: got {name} {got}, planned {want_name} {want}")
        # Raw bytes in native (little-endian) order, whatever the dtype.
        written += out.write(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
    missing = [name for name, _ in expected]
    if missing:
        raise RuntimeError(f"tensor stream ended before the plan: {len(missing)} missing, first {missing[0]}")
    return written
