"""Checking a safetensors file's header before anything maps the file.

The layout: an 8-byte little-endian header length N, N bytes of JSON (UTF-8)
`{"__metadata__": {str: str}, name: {"dtype", "shape", "data_offsets": [begin, end]}}`,
then the tensors' bytes, back to back. safetensors' own reader checks most of this, but
what it does with a file that lies is its business: a Rust panic (a BaseException in
Python), an error, or, for an offset past the end of a mapped file, a SIGBUS that kills the
process. `check_header` reads the header itself and refuses, with one line, a file where
any of it does not add up, so the reader only ever sees files that do.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

# Bytes per element of each dtype (safetensors' names).
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
               "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}  # fmt: skip
# safetensors' own limit on the header (MAX_HEADER_SIZE); a longer one is refused unread.
MAX_HEADER_BYTES = 100_000_000


class HeaderError(ValueError):
    """What is wrong with a header, in words for the one line the user sees."""


class JSONTextError(ValueError):
    """JSON text that cannot be parsed, in words: what follows "FILE: " in the one line."""


def _json_int(text: str) -> int:
    # int() refuses a literal longer than sys.get_int_max_str_digits() (4300 by default) with
    # a ValueError that json.loads lets through as it is; the only way a JSON integer fails.
    try:
        return int(text)
    except ValueError:
        raise JSONTextError(f"not usable JSON (an integer of {len(text.lstrip('-'))} digits, more than Python converts)") from None


def parse_json(text: str | bytes, object_pairs_hook=None):
    """json.loads for a file's JSON (a safetensors header, config.json, an index, gelugemm's
    record): every way the text itself is bad is one JSONTextError, worded for the user:
    not UTF-8, not JSON, nested too deep for the parser (RecursionError), an integer too long
    for Python to convert. An error raised by object_pairs_hook passes through as it is."""
    if isinstance(text, (bytes, bytearray)):
        try:
            text = bytes(text).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise JSONTextError(f"not UTF-8 text (byte {exc.start})") from None
    try:
        return json.loads(text, object_pairs_hook=object_pairs_hook, parse_int=_json_int)
    except json.JSONDecodeError as exc:
        raise JSONTextError(f"not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    except RecursionError:
        raise JSONTextError("not usable JSON (nested too deeply to parse)") from None


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    seen = {}
    for key, value in pairs:
        if key in seen:
            raise HeaderError(f"{key!r} is listed twice in the header")
        seen[key] = value
    return seen


def _non_negative_ints(value, count: int | None = None) -> bool:
    return (
        isinstance(value, list)
        and (count is None or len(value) == count)
        and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)
    )


def read_header(path: str | Path) -> dict:
    """The header of a safetensors file, checked: every tensor's bytes inside the file, where
    its dtype and shape say, none overlapping, none missing. Raises HeaderError."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise HeaderError(f"{size} bytes, shorter than the 8-byte header length")
        (length,) = struct.unpack("<Q", prefix)
        if length < 2 or length > MAX_HEADER_BYTES:
            raise HeaderError(f"header length {length} is not plausible (at most {MAX_HEADER_BYTES})")
        if 8 + length > size:
            raise HeaderError(f"header length {length} runs past the end of the {size}-byte file (truncated?)")
        raw = f.read(length)
    try:
        header = parse_json(raw, object_pairs_hook=_no_duplicates)
    except JSONTextError as exc:
        raise HeaderError(f"the header is {exc}") from None
    if not isinstance(header, dict):
        raise HeaderError("the header is not a JSON object")
    metadata = header.get("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise HeaderError("its __metadata__ is not a map of strings")
    data_bytes = size - 8 - length
    spans = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:
            raise HeaderError(f"tensor name {name!r} is not valid UTF-8") from None
        if not isinstance(entry, dict):
            raise HeaderError(f"tensor {name!r}: its entry is not a JSON object")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if not isinstance(dtype, str) or not _non_negative_ints(shape) or not _non_negative_ints(offsets, 2):
            raise HeaderError(f"tensor {name!r}: needs a dtype, a shape and two data_offsets (non-negative integers)")
        begin, end = offsets
        if begin > end or end > data_bytes:
            raise HeaderError(f"tensor {name!r}: data_offsets {offsets} outside the {data_bytes} data bytes")
        if dtype in DTYPE_BYTES and math.prod(shape) * DTYPE_BYTES[dtype] != end - begin:
            raise HeaderError(f"tensor {name!r}: {dtype} {shape} takes {math.prod(shape) * DTYPE_BYTES[dtype]} bytes, its offsets hold {end - begin}")
        spans.append((begin, end, name))
    position = 0
    for begin, end, name in sorted(spans):
        if begin != position:
            what = "overlaps the tensor before it" if begin < position else f"leaves a gap of {begin - position} bytes before it"
            raise HeaderError(f"tensor {name!r}: data_offsets [{begin}, {end}] {what}")
        position = end
    if position != data_bytes:
        raise HeaderError(f"the tensors take {position} bytes, the file holds {data_bytes} after the header (truncated?)")
    return header
