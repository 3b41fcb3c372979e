"""Launching Triton kernels with little host overhead.

Triton's Python dispatch (autotuner, heuristics, argument binding, specialization,
cache lookup) costs tens of microseconds a call on a slow host: more than a decode GEMM
takes on the GPU. `launch` sends the first call with a given key through that dispatch,
remembers the compiled kernel, its grid and its compile-time arguments, and launches the
compiled kernel directly on later calls with the same key. The key must hold everything
that selects a kernel: the caller's shapes, strides, dtypes and constexprs, and (added
here) the device and the 16-byte alignment of every tensor argument.
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch
import triton

try:  # Triton >= 3.4
    from triton import knobs as _knobs
except ImportError:  # pragma: no cover - older Triton
    _knobs = None


@functools.lru_cache(maxsize=None)
def interpreting() -> bool:
    """True when Triton kernels run in its CPU interpreter (TRITON_INTERPRET=1, read once,
    as Triton reads it once when a kernel is defined)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def num_programs(device: torch.device) -> int:
    """How many programs a persistent kernel launches: one per SM (4 under the interpreter)."""
    if device.type != "cuda":
        return 4
    return _num_sms(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _capability(device_index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device_index)


def device_capability(device: torch.device) -> tuple[int, int]:
    return _capability(device.index if device.index is not None else torch.cuda.current_device())


# Device-side tensor descriptors live in a global scratch buffer that Triton asks the
# host for at every launch. Kernels on one stream run in order, so one buffer per stream
# serves them all.
_scratch: dict = {}


def _alloc_scratch(size: int, alignment: int, stream):
    if interpreting():
        return torch.empty(size, dtype=torch.int8)
    buf = _scratch.get(stream)
    if buf is None or buf.numel() < size:
        buf = torch.empty(max(size, 1 << 20), dtype=torch.int8, device="cuda")
        _scratch[stream] = buf
    return buf


_allocator_set = False


def ensure_tma_allocator() -> None:
    """Give Triton the scratch allocator that device-side tensor descriptors need."""
    global _allocator_set
    if not _allocator_set:
        triton.set_allocator(_alloc_scratch)
        _allocator_set = True


def _innermost(kernel):
    while hasattr(kernel, "fn") and not isinstance(kernel, triton.runtime.JITFunction):
        kernel = kernel.fn
    return kernel


def _heuristic_layers(kernel):
    layers = []
    while not isinstance(kernel, triton.runtime.JITFunction):
        if isinstance(kernel, triton.runtime.Heuristics):
            layers.append(kernel)
        kernel = kernel.fn
    return layers


_compiled: dict = {}
_MAX_REMEMBERED = 4096
# the list recorded_launches() fills while its block runs (None: nothing is recorded)
_recording: list | None = None


@contextlib.contextmanager
def recorded_launches():
    """Every launch made through `launch` inside the block, in order, as (kernel name,
    config): the config the autotuner kept for that call, as Triton prints it ("" for a
    kernel without one). The benchmark reports with it which tile each timed kernel ran."""
    global _recording
    outer, _recording = _recording, []
    try:
        yield _recording
    finally:
        _recording = outer


def _record(kernel, config) -> None:
    _recording.append((_innermost(kernel).__name__, "" if config is None else str(config)))


def _stream(device_index: int) -> int:
    return torch._C._cuda_getCurrentRawStream(device_index)


def _hooks():
    if _knobs is None:
        return None, None
    return _knobs.runtime.launch_enter_hook, _knobs.runtime.launch_exit_hook


def launch(kernel, grid, args: tuple, constexprs: dict, key: tuple, slot: list | None = None) -> None:
    """kernel[grid](*args, **constexprs), with Triton's dispatch skipped after the first
    call per key. `kernel` is an autotuned (optionally heuristics-wrapped) @triton.jit
    function whose parameters are `args` (runtime values and tensors) followed by
    compile-time ones; `grid` maps the full argument dict to the launch grid.

    slot: a one-element list a caller keeps per call signature, holding the compiled kernel
    after the first launch; later launches through it skip even the cache key (alignment of
    every tensor, device). Only for callers whose signature already fixes `key` and the
    16-byte alignment of every tensor argument.
    """
    if interpreting():
        kernel[grid](*args, **constexprs)
        if _recording is not None:
            _record(kernel, getattr(kernel, "best_config", None))
        return
    if slot is not None and slot[0] is not None:
        device_index, hit = slot[0]
        if device_index == torch._C._cuda_getDevice():
            _run(hit, args, device_index)
            if _recording is not None:
                _record(kernel, hit[4])
            return
    aligned = tuple(a.data_ptr() % 16 == 0 for a in args if isinstance(a, torch.Tensor))
    device_index = torch.cuda.current_device()
    full_key = (id(kernel), device_index, aligned, key)
    hit = _compiled.get(full_key)
    if hit is None:
        kernel[grid](*args, **constexprs)
        if len(_compiled) < _MAX_REMEMBERED:
            _remember(kernel, grid, args, constexprs, full_key)
        hit = _compiled.get(full_key)
    else:
        _run(hit, args, device_index)
    if _recording is not None:
        _record(kernel, hit[4] if hit is not None else getattr(kernel, "best_config", None))
    if slot is not None and hit is not None:
        slot[0] = (device_index, hit)


def _run(hit, args, device_index) -> None:
    # The same call Triton's JITFunction.run makes once it has the compiled kernel.
    compiled, g, tail = hit[:3]
    stream = _stream(device_index)
    enter, exit_ = _hooks()
    metadata = None if enter is None else compiled.launch_metadata(g, stream, *args, *tail)
    compiled.run(g[0], g[1], g[2], stream, compiled.function, compiled.packed_metadata, metadata, enter, exit_, *args, *tail)


def _remember(kernel, grid, args, constexprs, full_key) -> None:
    # Rebuild every argument Triton bound for the launch just made (ours, the
    # autotuner's config, the heuristics' values, the defaults), then fetch the compiled
    # kernel those arguments select: warmup compiles nothing that exists already.
    jit = _innermost(kernel)
    config = getattr(kernel, "best_config", None)
    values = dict(zip(jit.arg_names, args))
    values.update(constexprs)
    values.update(config.kwargs if config is not None else {})
    heuristic_values = {}
    for layer in _heuristic_layers(kernel):  # outermost first, as Triton applies them
        for name, rule in layer.values.items():
            heuristic_values[name] = values[name] = rule(values)
    for param in jit.params:
        if param.name not in values:
            values[param.name] = param.default
    g = (tuple(grid(values)) + (1, 1))[:3]
    options = config.all_kwargs() if config is not None else {}
    compiled = jit.warmup(*args, grid=g, **constexprs, **heuristic_values, **options)
    if hasattr(compiled, "result"):  # Triton versions that compile asynchronously
        compiled = compiled.result()
    if not all(hasattr(compiled, a) for a in ("run", "function", "packed_metadata", "launch_metadata")):
        return
    # The entry holds the kernel object too: its id is in the key, and a freed kernel's id
    # can be another kernel's (a config-sweeping probe that builds an autotuner per config
    # got the previous one's compiled kernel, for the new one's workspace: an illegal address).
    # The config is kept for recorded_launches.
    tail = tuple(values[name] for name in jit.arg_names[len(args) :])
    _compiled[full_key] = (compiled, g, tail, kernel, config)


def launch_cache_size() -> int:
    """How many (kernel, call signature) pairs launch directly."""
    return len(_compiled)
