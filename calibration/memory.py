"""Resident memory of this process, for quantize's report (Linux /proc; getrusage elsewhere).

Two numbers, because pages of a file a process maps count as resident (RssFile) though the
kernel can drop them at will. (quantize reads checkpoints with read(), not mmap, so its
resident set is what it allocated plus the interpreter's and libraries' own pages.)

- peak_rss: the kernel's high-water mark of all resident memory (VmHWM), reset when
  the meter starts where the kernel allows it (`scope` says "this run"), else the
  process's peak so far ("process"). It includes any mapped file pages.
- peak_anon: the largest anonymous (heap: tensors, interpreter) resident memory seen at
  the sample points, i.e. what the run itself allocated, without file pages.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import resource
import sys


def _proc_status() -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssFile in bytes; {} where /proc is not there."""
    fields = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                    fields[key] = int(value.split()[0]) * 1024
    except OSError:
        return {}
    return fields


def available_memory() -> int | None:
    """Bytes this process could allocate now: MemAvailable plus free swap (Linux /proc/meminfo),
    else the physical memory (sysconf), else None (unknown). A bound for refusing up front
    what cannot fit (calibration.data.check_tokens_fit), not a promise that less will."""
    fields = {}
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("MemAvailable", "SwapFree"):
                    fields[key] = int(value.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        fields = {}
    if "MemAvailable" in fields:
        return fields["MemAvailable"] + fields.get("SwapFree", 0)
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def format_bytes(n: int) -> str:
    """1536 -> "1.5 KiB"; GiB and TiB for what a --tokens asks."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _reset_high_water_mark() -> bool:
    # Writing 5 to clear_refs resets VmHWM (Linux >= 4.0).
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _malloc_trim():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


_MALLOC_TRIM = _malloc_trim() if sys.platform.startswith("linux") else None


def release_free_memory() -> None:
    """Hand memory the process freed back to the OS (glibc's malloc_trim; a no-op elsewhere).

    glibc keeps freed blocks below its mmap threshold in its heap for reuse; after one MLP
    is done they are the size of an MLP, and the next layer's different sizes fragment
    around them. Trimming between layers keeps the resident set at what is live.
    """
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


class MemoryMeter:
    """Start it before the work, `sample()` where memory peaks, read `facts()` at the end."""

    def __init__(self):
        self.scope = "this run" if _reset_high_water_mark() else "process"
        status = _proc_status()
        self.start_rss = status.get("VmRSS")
        self.start_anon = status.get("RssAnon")
        self.peak_anon = self.start_anon

    def sample(self) -> None:
        anon = _proc_status().get("RssAnon")
        if anon is not None and (self.peak_anon is None or anon > self.peak_anon):
            self.peak_anon = anon

    def facts(self) -> dict[str, int | str | None]:
        self.sample()
        peak = _proc_status().get("VmHWM")
        if peak is None:
            maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            peak = maxrss if sys.platform == "darwin" else maxrss * 1024  # bytes on macOS, KiB on Linux
        if peak is not None and self.start_rss is not None:
            # Linux sums its RSS counters per CPU lazily: the high-water mark can read a few
            # pages under a resident size read just after it was reset.
            peak = max(peak, self.start_rss)
        return {
            "start_rss_bytes": self.start_rss,
            "peak_rss_bytes": peak,
            "peak_rss_scope": self.scope,
            "start_anon_bytes": self.start_anon,
            "peak_anon_bytes": self.peak_anon,
        }
