"""int8 weights quantized a block of output channels at a time, and how far they are from
the float weights they encode (quantize's per-layer report).

Each output channel's scale comes from its own row of W as [N, K], so quantizing rows in
blocks gives exactly what `kernels.int8.quantize_weight` gives on the whole weight, with
temporaries the size of a block instead of W: a 4096 x 16384 weight stays within its own
bytes plus a few MB. The blocks are small enough (QUANTIZE_BLOCK_ELEMENTS) that their
passes (convert to float32, absmax, scale, round, the error) run in the CPU's cache, and
the error is measured on the block just quantized (`quantize_weight_blocked(error=...)`),
not by reading W again: quantize's whole cost is a few passes over cached blocks.
"""

from __future__ import annotations

import math
import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch

from kernels.int8 import INT8_MAX, expand_scale, scale_from_absmax
from kernels.quantized import QuantizedWeight
from kernels.reference import as_out_in

# Elements of W per block where a whole block is computed at once (calibration's h): 4 MB
# of float32 temporaries each.
BLOCK_ELEMENTS = 1 << 20
# Elements of W per block of the weight quantizer: 2 MB of float32 per scratch buffer, which
# stays in cache through the block's passes; the buffers are reused from block to block
# (a fresh temporary per pass was page-faulted in each time: 3x slower on the 2-core CI host).
QUANTIZE_BLOCK_ELEMENTS = 1 << 19
# On a GPU (quantize --device cuda; verify quantizes an original checkpoint's weights where it
# runs them) a block is a kernel launch per pass, and memory is no constraint: 64 MB buffers,
# a 4096 x 16384 weight in four blocks, ~20 bandwidth-bound passes each (~2 ms per weight on
# an H100; the launches and the error's per-block .item() add well under a millisecond).
DEVICE_BLOCK_ELEMENTS = 1 << 24


def compute_threads() -> int:
    """torch's intra-op threads for quantizing on the CPU: every core but one. The blocks are
    small and many (a few hundred passes of ~100 us per weight), and two OpenMP threads on a
    2-core host wait on each other at every pass whenever the other core is busy (quantize's
    writer thread, any other process): 5-80x slower, where one thread is 1.7x slower on an
    idle host and never stalls. The core left over writes (quantize) or is the OS's."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(torch.get_num_threads(), cores - 1))


@contextmanager
def intra_op_threads(n: int) -> Iterator[None]:
    """torch.set_num_threads(n) for the block, restored after."""
    before = torch.get_num_threads()
    if n != before:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


def row_blocks(n: int, k: int, elements: int = BLOCK_ELEMENTS) -> list[slice]:
    """Slices of W's N output channels, each about `elements` of [N, K]."""
    rows = max(1, elements // max(k, 1))
    return [slice(start, min(n, start + rows)) for start in range(0, n, rows)]


class _Blocks:
    """A weight's output channels a block at a time, in three float32 scratch buffers
    [rows, groups * G] on the weight's device, reused by every block: `block` (W's rows),
    `q` and `tmp`.

    Per channel G is K (one group); per group the last group is zero-padded, and the
    padding columns stay zero (a zero changes no absmax, no sum, and quantizes to 0).
    """

    def __init__(self, n: int, k: int, group_size: int | None, device: torch.device):
        self.n, self.k = n, k
        self.group = group_size or max(k, 1)
        self.groups = -(-k // self.group)
        width = self.groups * self.group
        elements = QUANTIZE_BLOCK_ELEMENTS if device.type == "cpu" else DEVICE_BLOCK_ELEMENTS
        self.rows = max(1, min(n, elements // width))
        self.block, self.q, self.tmp = (torch.zeros(self.rows, width, device=device) for _ in range(3))

    def __iter__(self):
        """(start, rows) of each block."""
        for start in range(0, self.n, self.rows):
            yield start, min(self.rows, self.n - start)

    def grouped(self, t: torch.Tensor) -> torch.Tensor:
        return t.view(t.shape[0], self.groups, self.group)

    def load(self, w_nk: torch.Tensor, start: int, r: int, multiplier: torch.Tensor | None) -> torch.Tensor:
        """W's rows [start, start + r) in float32 (times the multiplier along K): block[:r]."""
        block = self.block[:r]
        rows = block[:, : self.k]
        rows.copy_(w_nk[start : start + r])
        if multiplier is not None:
            rows.mul_(multiplier[None, :])  # in float32, as W.to(float32) * multiplier
        return block

    def quantize(self, block: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(q as float32 [r, width], scale [r, groups]) of loaded rows: kernels.int8.quantize_weight's
        arithmetic (absmax scale; x * (1 / scale), clamped to +-127, rounded half to even)."""
        r = block.shape[0]
        tmp = torch.abs(block, out=self.tmp[:r])
        scale = scale_from_absmax(self.grouped(tmp).amax(dim=2))
        q = self.q[:r]
        torch.mul(self.grouped(block), torch.reciprocal(scale)[:, :, None], out=self.grouped(q))
        q.clamp_(-INT8_MAX, INT8_MAX).round_()
        return q, scale


@dataclass
class WeightError:
    """How far an int8 weight is from the float weight it encodes, summed a block of rows at a time.

    rel_frobenius: ||W - q*s|| / ||W|| (0 for an all-zero W).
    max_abs_steps: max |W - q*s| / s, in units of each element's own scale step;
        at most 0.5 when the scales come from the absmax.
    float32 is exact enough for a report: |W - q*s| is at most half a step, and float32
    holds it to about 1e-5 of a step (values up to 127 steps); the sums are float64.
    """

    diff_sq: float = 0.0
    norm_sq: float = 0.0
    max_steps: float = 0.0

    def add(self, blocks: _Blocks, block: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> None:
        """block: rows of W (times the multiplier) in float32; q: their int8 values as float32,
        overwritten; scale: their scales [r, groups]; all of `blocks`' width."""
        if not block.numel():
            return
        tmp = torch.mul(block, block, out=blocks.tmp[: block.shape[0]])
        self.norm_sq += torch.sum(tmp, dtype=torch.float64).item()
        diff = blocks.grouped(q).mul_(scale[:, :, None]).sub_(blocks.grouped(block))  # q*s - W: the sign does not matter
        # max |d| / s of a row or group is its largest |d| over s (division by a positive
        # number is monotonic): the elementwise maximum, with one division per group
        self.max_steps = max(self.max_steps, (diff.abs_().amax(dim=2) / scale).max().item())
        self.diff_sq += torch.sum(diff.square_(), dtype=torch.float64).item()

    def to_dict(self) -> dict[str, float]:
        return {
            "rel_frobenius": math.sqrt(self.diff_sq) / math.sqrt(self.norm_sq) if self.norm_sq > 0 else 0.0,
            "max_abs_steps": self.max_steps,
        }


def quantize_weight_blocked(
    w: torch.Tensor,
    *,
    weight_layout: str = "out_in",
    group_size: int | None = None,
    multiplier: torch.Tensor | None = None,
    error: WeightError | None = None,
    device: torch.device | str | None = None,
) -> QuantizedWeight:
    """`kernels.int8.quantize_weight`, a block of output channels at a time (bit for bit the same),
    on W's device or on `device` (every step is IEEE float32 arithmetic, correctly rounded on
    a GPU as on the CPU: the same int8 values and scales; tests/test_calibration_weights.py
    and tests/test_quantize_device.py check it).

    multiplier: float32 [K], applied along K in float32 before quantizing (SmoothQuant's
        W1 * s; the same products as calibration.smooth.fold_into_weight).
    error: a WeightError to add this weight's error to (W * multiplier against q * s),
        measured on each block as it is quantized. Its sums are float64 in another order on
        a GPU: the same numbers to about 1e-9 relative or better, not bit for bit (its max
        is order-free).
    device: where to compute (None: W's own). W and the multiplier are copied there and the
        int8 values and scales come back to W's device (quantize: CPU weights, a GPU's
        arithmetic). From page-locked memory the copy does not block the host; the results'
        copy back does, so W may be overwritten once this returns.
    """
    home = w.device
    there = home if device is None else torch.device(device)
    if there.type == home.type and there.index in (None, home.index):  # "cuda" for a weight on cuda:0
        there = home
    if there == home:
        with intra_op_threads(compute_threads() if home.type == "cpu" else torch.get_num_threads()):
            return _quantize_blocked(w, weight_layout, group_size, multiplier, error)
    w = w.to(there, non_blocking=w.is_pinned())  # in its stored layout: a contiguous copy
    multiplier = None if multiplier is None else multiplier.to(there)
    qw = _quantize_blocked(w, weight_layout, group_size, multiplier, error)
    return QuantizedWeight(_copied_back(qw.data, home), qw.scale.to(home), qw.group_size)


def _copied_back(t: torch.Tensor, home: torch.device) -> torch.Tensor:
    """A GPU result copied to `home`, waiting for it. On the CPU into page-locked memory: the
    copy runs at the bus's speed, and torch's pinned-memory cache hands the same pages back
    weight after weight, where a fresh 64 MB tensor would be page-faulted in each time."""
    out = torch.empty(t.shape, dtype=t.dtype, device=home, pin_memory=home.type == "cpu" and t.is_cuda)
    return out.copy_(t)


def _quantize_blocked(w, weight_layout, group_size, multiplier, error) -> QuantizedWeight:
    w_nk = as_out_in(w, weight_layout)
    n, k = w_nk.shape
    blocks = _Blocks(n, k, group_size, w.device)
    data = torch.empty(n, k, dtype=torch.int8, device=w.device)
    # Written in place: a small tensor kept per block would sit between the blocks'
    # temporaries in the allocator's heap and keep it from giving their memory back.
    scale = torch.empty(n, blocks.groups, dtype=torch.float32, device=w.device)
    for start, r in blocks:
        block = blocks.load(w_nk, start, r, multiplier)
        q, block_scale = blocks.quantize(block)
        data[start : start + r] = q[:, :k]  # whole numbers in [-127, 127]: the cast is exact
        scale[start : start + r] = block_scale
        if error is not None:
            error.add(blocks, block, q, block_scale)
    del blocks
    if weight_layout == "in_out":
        data = data.t().contiguous()
    return QuantizedWeight(data, scale.view(n) if group_size is None else scale, group_size)


def dequantized_rows(qw: QuantizedWeight, weight_layout: str, rows: slice) -> torch.Tensor:
    """Rows `rows` of the float32 weight an int8 weight stands for, as [rows, K]."""
    q = as_out_in(qw.data, weight_layout)[rows].to(torch.float32)
    return q * expand_scale(qw.scale[rows], q.shape[1], qw.group_size)


def weight_error(
    w: torch.Tensor, qw: QuantizedWeight, weight_layout: str = "out_in", multiplier: torch.Tensor | None = None
) -> dict[str, float]:
    """How far the int8 weight is from the float weight it encodes (W * multiplier along K,
    if given): WeightError's rel_frobenius and max_abs_steps, for a weight quantized already
    (quantize measures it while quantizing: quantize_weight_blocked(error=...))."""
    w_nk = as_out_in(w, weight_layout)
    q_nk = as_out_in(qw.data, weight_layout)
    n, k = w_nk.shape
    blocks = _Blocks(n, k, qw.group_size, w.device)
    scale = qw.scale.view(n, blocks.groups)
    error = WeightError()
    for start, r in blocks:
        block = blocks.load(w_nk, start, r, multiplier)
        q = blocks.q[:r]
        q[:, :k] = q_nk[start : start + r]  # the padding columns stay zero
        error.add(blocks, block, q, scale[start : start + r])
    return error.to_dict()
