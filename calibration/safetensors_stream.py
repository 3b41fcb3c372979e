"""The safetensors file format at the byte level: reading a header's offsets, writing a file one
tensor at a time (safetensors' own `save_file` takes the whole dict at once), and copying a
tensor's bytes from one file to another without holding it in memory.

The format: an 8-byte little-endian header length, the JSON header
`{"__metadata__": {str: str}, name: {"dtype", "shape", "data_offsets": [begin, end]}}`
padded with spaces to a multiple of 8, then the tensors' bytes back to back. The header
needs every dtype and shape first: the caller plans them, then yields tensors in that order.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Iterable

import torch

from calibration.errors import CheckpointError
from calibration.safetensors_header import DTYPE_BYTES
from calibration.safetensors_header import read_header as checked_header

DTYPE_NAMES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}  # fmt: skip
TORCH_DTYPES = {name: dtype for dtype, name in DTYPE_NAMES.items()}

# Raw copies move this many bytes at a time: the copy's memory, whatever the tensor's size.
COPY_CHUNK = 16 << 20
# Bytes handed to write_stream's writer thread and not yet written (their tensors stay alive
# until they are): about one 4096 x 16384 MLP's int8 weights, so that the next layer is read
# and quantized while this one's are written. One tensor larger than this waits alone.
WRITE_AHEAD_BYTES = 128 << 20


@dataclass(frozen=True)
class TensorInfo:
    dtype: str  # safetensors dtype string: "F32", "BF16", "I8", ...
    shape: tuple[int, ...]


@dataclass(frozen=True)
class StoredTensor:
    """Where a tensor's bytes sit in a safetensors file (absolute offsets)."""

    path: Path
    info: TensorInfo
    begin: int
    end: int


def tensor_bytes(info: TensorInfo) -> int:
    return math.prod(info.shape) * DTYPE_BYTES[info.dtype]


def read_header(path: str | Path) -> tuple[dict[str, StoredTensor], dict[str, str]]:
    """({name: StoredTensor}, metadata) of a safetensors file, its header checked first
    (calibration.safetensors_header: lengths, offsets inside the file, no overlaps)."""
    path = Path(path)
    header = dict(checked_header(path))  # parsed and checked (offsets, sizes, overlaps): HeaderError
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
    start = 8 + length
    metadata = header.pop("__metadata__", None) or {}
    tensors = {
        name: StoredTensor(path, TensorInfo(entry["dtype"], tuple(entry["shape"])), start + entry["data_offsets"][0],
                           start + entry["data_offsets"][1])
        for name, entry in header.items()
    }  # fmt: skip
    return tensors, metadata


class ReadBuffer:
    """One byte buffer that read_stored reads into, again and again, for a caller that drops
    each tensor before it reads the next (quantize: one float weight at a time). Its pages stay
    mapped: a fresh allocation per 4096 x 16384 fp16 weight is page-faulted in each time, and
    the kernel zeroing those pages took 4x as long as copying the bytes from the page cache
    (62 against 13 ms per 128 MiB on the 2-core CI host). It grows to the largest tensor read.
    pin_memory: page-locked, for tensors copied on to a GPU (verify): the copy runs at the
    bus's speed, without the driver staging it through its own buffer."""

    def __init__(self, pin_memory: bool = False) -> None:
        self._bytes: torch.Tensor | None = None
        self.pin_memory = pin_memory

    def take(self, nbytes: int) -> torch.Tensor:
        """uint8 [nbytes], overwriting what the last take() returned."""
        if self._bytes is None or self._bytes.numel() < nbytes:
            self._bytes = None  # the old one freed before the larger one is made
            self._bytes = torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.pin_memory)
        return self._bytes[:nbytes]


def read_stored(stored: StoredTensor, handle: BinaryIO | None = None, rows: tuple[int, int] | None = None,
                buffer: ReadBuffer | None = None) -> torch.Tensor:  # fmt: skip
    """A tensor's bytes read (not mapped) into a new tensor: its memory is the process's heap,
    and the file's pages stay in the page cache, not in this process's resident set.

    rows: [start, stop) of dim 0 only (rows are contiguous in the file).
    buffer: read into it instead: the tensor is valid until the buffer's next read.
    """
    info = stored.info
    shape, begin = list(info.shape), stored.begin
    if rows is not None:
        row_bytes = math.prod(shape[1:]) * DTYPE_BYTES[info.dtype]
        begin += rows[0] * row_bytes
        shape[0] = rows[1] - rows[0]
    if info.dtype not in TORCH_DTYPES:
        # a dtype the format allows (U32, F8 ...) that no tensor gelugemm reads is stored in
        raise CheckpointError(f"{stored.path}: cannot read a {info.dtype} tensor (gelugemm reads {', '.join(TORCH_DTYPES)})")
    dtype = TORCH_DTYPES[info.dtype]
    if buffer is not None:
        out = buffer.take(math.prod(shape) * DTYPE_BYTES[info.dtype]).view(dtype).view(shape)
    else:
        out = torch.empty(shape, dtype=dtype)
    view = out.reshape(-1).view(torch.uint8).numpy()
    owned = handle is None
    f = open(stored.path, "rb") if owned else handle
    try:
        f.seek(begin)
        got = f.readinto(view) if view.size else 0
    finally:
        if owned:
            f.close()
    if got != view.size:
        raise OSError(f"{stored.path}: short read ({got} of {view.size} bytes)")
    return out


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


def _copy_bytes(out: BinaryIO, stored: StoredTensor) -> int:
    """Copy a stored tensor's bytes into `out`, COPY_CHUNK at a time."""
    written = 0
    with open(stored.path, "rb") as f:
        f.seek(stored.begin)
        left = stored.end - stored.begin
        while left:
            block = f.read(min(COPY_CHUNK, left))
            if not block:
                raise OSError(f"{stored.path}: ended while copying a tensor")
            written += out.write(block)
            left -= len(block)
    return written


def write_stream(
    out: BinaryIO,
    plan: dict[str, TensorInfo],
    tensors: Iterable[tuple[str, torch.Tensor | StoredTensor]],
    metadata: dict[str, str],
    final_metadata: Callable[[], dict[str, str]] | None = None,
) -> int:
    """Write the planned tensors as they come; returns the bytes written.

    `tensors` must yield exactly the plan's names, in its order, with its dtypes and shapes:
    a torch tensor, or a StoredTensor whose bytes are copied from its file as they are.

    final_metadata: called once every tensor is written; its result replaces `metadata` in
    the header, rewritten in place. It must give a header of the same length (values that
    were placeholders of their final length: quantize's source digests, hashed meanwhile).

    The writes run on one background thread, in order, at most WRITE_AHEAD_BYTES behind:
    while the OS takes one layer's bytes, the caller computes the next (quantize's next
    layer). A write's error is raised here, at a later tensor or at the end.
    """
    written = out.write(header_bytes(plan, metadata))
    expected = iter(plan.items())
    in_flight: deque[tuple[Future, int]] = deque()  # (the write, its bytes)
    ahead = 0
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="safetensors-write") as writer:
        for name, t in tensors:
            want_name, want = next(expected, (None, None))
            got = t.info if isinstance(t, StoredTensor) else TensorInfo(DTYPE_NAMES.get(t.dtype, str(t.dtype)), tuple(t.shape))
            if name != want_name or got != want:
                raise RuntimeError(f"tensor stream out of plan: got {name} {got}, planned {want_name} {want}")
            if isinstance(t, StoredTensor):
                in_flight.append((writer.submit(_copy_bytes, out, t), t.end - t.begin))
            else:
                # Raw bytes in native (little-endian) order, whatever the dtype (the view keeps t alive).
                data = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data
                in_flight.append((writer.submit(out.write, data), len(data)))
            ahead += in_flight[-1][1]
            while ahead > WRITE_AHEAD_BYTES and len(in_flight) > 1:
                done, size = in_flight.popleft()
                written += done.result()
                ahead -= size
        for done, _ in in_flight:
            written += done.result()
    missing = [name for name, _ in expected]
    if missing:
        raise RuntimeError(f"tensor stream ended before the plan: {len(missing)} missing, first {missing[0]}")
    if final_metadata is not None:
        first, final = header_bytes(plan, metadata), header_bytes(plan, final_metadata())
        if len(final) != len(first):
            raise RuntimeError(f"final metadata changes the header's length ({len(first)} -> {len(final)} bytes)")
        out.seek(0)
        out.write(final)
        out.seek(0, os.SEEK_END)
    return written


def fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
