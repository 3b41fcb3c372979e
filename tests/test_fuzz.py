"""Property-based fuzzing (hypothesis) of the checkpoint reader and both commands.

- Any valid checkpoint (every naming family in tests/checkpoints.py, both layouts, fp32, fp16
  or bf16, odd sizes, biases missing, any GELU config) quantizes (exit 0) and verifies (exit 0
  or 1, never 2, never a traceback).
- Any mutated file (header bytes flipped, a lying header length or data offset, truncation in
  every region, dtype and shape lies, duplicate or overlapping tensors, non-UTF-8 names) is
  refused by quantize and verify with one line and exit 2, and leaves no file behind; the
  reader raises nothing but CheckpointError on it. Mutations that keep the file valid
  (a flipped byte inside a name; a dtype of the same width) may also pass: then the output is
  a whole quantized file.

CI runs a bounded number of examples (about a minute in all). The long run:
GELUGEMM_FUZZ_EXAMPLES=N python -m pytest tests/test_fuzz.py runs N examples of each
mutation property and N/10 of the valid-checkpoint one (it quantizes and verifies each);
the README records the last long run.
"""

from __future__ import annotations

import json
import math
import os
import struct
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st
from safetensors.torch import save

from calibration.checkpoint import open_checkpoint, tensor_infos
from calibration.errors import CheckpointError
from calibration.quantized_file import is_quantized_file
from calibration.safetensors_header import MAX_HEADER_BYTES
from checkpoints import FAMILIES, checkpoint_tensors
from cli_helpers import invoke
from kernels.schemes import HIDDEN_ACT_GELU

LONG = int(os.environ.get("GELUGEMM_FUZZ_EXAMPLES", "0"))
VALID_EXAMPLES = LONG // 10 if LONG else 80
MUTATED_EXAMPLES = LONG if LONG else 1000
READER_EXAMPLES = LONG if LONG else 3000
FUZZ = settings(deadline=None, database=None, print_blob=True, suppress_health_check=[HealthCheck.too_slow])


pytestmark = pytest.mark.usefixtures("wide_consoles")


def files_in(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def assert_refused(result, what: str) -> None:
    """Exit 2, one `error:` line, no traceback (CliRunner keeps an uncaught exception aside)."""
    assert result.exit_code == 2, (what, result.exit_code, result.output, result.exception)
    assert isinstance(result.exception, SystemExit), (what, result.exception)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), (what, result.stderr)


# ---- valid checkpoints -------------------------------------------------------------------------

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@st.composite
def checkpoints(draw) -> dict:
    family = draw(st.sampled_from(sorted(FAMILIES)))
    plain = FAMILIES[family].block == ""
    spec = {
        "family": family,
        "d_model": draw(st.integers(1, 40)),
        "d_ff": draw(st.integers(1, 72)),
        "n_layers": 1 if plain else draw(st.integers(1, 3)),
        "dtype": draw(st.sampled_from(sorted(DTYPES))),
        "bias1": True if plain else draw(st.booleans()),  # a plain file is told by its b1
        "bias2": draw(st.booleans()),
        "zero_channel": draw(st.booleans()),  # an all-zero output channel in W1
        "seed": draw(st.integers(0, 2**31 - 1)),
        "config": draw(st.one_of(st.none(), st.sampled_from(sorted(HIDDEN_ACT_GELU)))),
        "scheme": draw(st.sampled_from(["w8a16", "w8a8"])),
    }
    if spec["scheme"] == "w8a16":
        # a group size dividing both input widths: the format's loaders refuse any other (quantize too)
        divides = [g for g in range(1, 81) if spec["d_model"] % g == 0 and spec["d_ff"] % g == 0]
        spec["options"] = draw(st.sampled_from([[], ["--granularity", f"group:{draw(st.sampled_from(divides))}"]]))
    else:
        activations = draw(st.sampled_from(["dynamic", "group:32", "group:64", "group:128", "static"]))
        method = []
        if activations == "static":
            method = draw(st.sampled_from([[], ["--method", "mse"], ["--method", "percentile:99.9"], ["--method", "max"]]))
        smooth = draw(st.sampled_from([[], ["--smooth", str(draw(st.sampled_from([0.0, 0.5, 0.8, 1.0])))]]))
        # calibration rows exactly where they are read: static scales, SmoothQuant's statistics
        calib = ["--calib", "synthetic", "--tokens", str(draw(st.integers(1, 48)))] if activations == "static" or smooth else []
        spec["options"] = ["--activations", activations] + method + smooth + calib
    return spec


def write_spec(folder: Path, spec: dict) -> Path:
    tensors = checkpoint_tensors(spec["family"], d_model=spec["d_model"], d_ff=spec["d_ff"], n_layers=spec["n_layers"],
                                 dtype=DTYPES[spec["dtype"]], bias2=spec["bias2"], seed=spec["seed"])  # fmt: skip
    fam = FAMILIES[spec["family"]]
    for i in range(spec["n_layers"]):
        w1 = "w1" if fam.block == "" else fam.fc1_prefix(i) + ".weight"
        if spec["zero_channel"]:
            (tensors[w1][0] if fam.weight_layout == "out_in" else tensors[w1][:, 0]).zero_()
        if not spec["bias1"]:
            tensors.pop(fam.fc1_prefix(i) + ".bias")
    path = folder / "model.safetensors"
    path.write_bytes(save({k: v.contiguous() for k, v in tensors.items()}))
    config = config_of(spec)
    if config:
        (folder / "config.json").write_text(json.dumps(config))
    return path


# Checkpoints whose layout only config.json can tell (GPTBigCode uses GPT-2's names with
# nn.Linear weights, GPT-2 Conv1D ones; a square or bias-less MLP does not say which) come
# with the model_type a real one has.
MODEL_TYPES = {"gpt-bigcode": "gpt_bigcode", "gpt2": "gpt2"}


def config_of(spec: dict) -> dict:
    config = {"model_type": MODEL_TYPES[spec["family"]]} if spec["family"] in MODEL_TYPES else {}
    if spec["config"] is not None:
        config["hidden_act"] = spec["config"]
    return config


@settings(FUZZ, max_examples=VALID_EXAMPLES)
@given(spec=checkpoints())
def test_any_valid_checkpoint_quantizes_and_verifies(spec):
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        source = write_spec(folder, spec)
        out, report = folder / "q.safetensors", folder / "q.json"
        result = invoke("quantize", source, "--scheme", spec["scheme"], *spec["options"], "-o", out, "--json", report)
        assert result.exit_code == 0, (spec, result.output, result.exception)
        assert is_quantized_file(out) and json.loads(report.read_text())["tool"] == "gelugemm"
        assert sorted(p.name for p in folder.iterdir()) == sorted({"model.safetensors", "q.safetensors", "q.json"}
                                                                  | ({"config.json"} if config_of(spec) else set()))  # fmt: skip
        for target in (out, source):  # the quantized file against its source; the original, every dtype
            # the torch backend: the reader and the commands are what is fuzzed here; on a GPU
            # machine the kernels would compile for every random shape (tests/test_op*.py test them)
            result = invoke("verify", target, "--tokens", "32", "--backend", "torch", "--json", folder / "v.json")
            assert result.exit_code in (0, 1), (spec, target.name, result.output, result.exception)
            assert isinstance(result.exception, (SystemExit, type(None))), result.exception
            verdict = json.loads((folder / "v.json").read_text())
            assert verdict["passed"] == (result.exit_code == 0)


# ---- mutated files -----------------------------------------------------------------------------


def split(blob: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8 : 8 + n]), blob[8 + n :]


def join(header: dict | str | bytes, data: bytes) -> bytes:
    text = header if isinstance(header, (str, bytes)) else json.dumps(header, separators=(",", ":"))
    raw = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else text
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + data


def small_checkpoint(seed: int, family: str) -> bytes:
    tensors = checkpoint_tensors(family, d_model=8, d_ff=12, n_layers=1, seed=seed)
    return save({k: v.contiguous() for k, v in tensors.items()})


MUTATIONS = ("flip header bytes", "lying header length", "lying offsets", "truncation", "dtype lie", "shape lie",
             "duplicate tensor", "overlapping tensor", "non-UTF-8 name")  # fmt: skip


@st.composite
def mutated(draw) -> tuple[str, bytes, bool]:
    """(the mutation, the file's bytes, whether it must be refused: False where it may stay valid)."""
    blob = small_checkpoint(draw(st.integers(0, 1000)), draw(st.sampled_from(["bert", "gpt2", "plain"])))
    header, data = split(blob)
    n = struct.unpack("<Q", blob[:8])[0]
    names = sorted(k for k in header if k != "__metadata__")
    name = draw(st.sampled_from(names))
    kind = draw(st.sampled_from(MUTATIONS))
    if kind == "flip header bytes":
        raw = bytearray(blob)
        for _ in range(draw(st.integers(1, 4))):
            raw[8 + draw(st.integers(0, n - 1))] ^= draw(st.integers(1, 255))
        return kind, bytes(raw), False  # a flip inside a name or a digit can leave a valid file
    if kind == "lying header length":
        lie = draw(st.one_of(st.sampled_from([0, 1, n - 1, n + 1, n + 8, len(blob), MAX_HEADER_BYTES + 1, 2**63, 2**64 - 1]),
                             st.integers(0, 2**64 - 1)))  # fmt: skip
        assume(lie != n)
        return kind, struct.pack("<Q", lie) + blob[8:], True
    if kind == "lying offsets":
        begin, end = header[name]["data_offsets"]
        lie = draw(st.sampled_from([
            [begin + 1, end + 1], [begin - 1, end - 1], [begin, end + 1], [begin, end - 1], [end, begin],
            [begin, len(data) + 8], [0, end - begin], [begin, 2**64 + 5], [-1, end], [begin + 0.5, end], [begin],
        ]))  # fmt: skip
        assume(lie != [begin, end])
        header[name]["data_offsets"] = lie
        return kind, join(header, data), True
    if kind == "truncation":
        region = draw(st.sampled_from(["length", "header", "header end", "data", "last byte"]))
        cut = {"length": draw(st.integers(0, 7)), "header": draw(st.integers(8, 8 + n - 1)), "header end": 8 + n,
               "data": draw(st.integers(8 + n + 1, len(blob) - 1)), "last byte": len(blob) - 1}[region]  # fmt: skip
        return f"{kind} ({region})", blob[:cut], True
    if kind == "dtype lie":
        dtype = header[name]["dtype"]
        new = draw(st.sampled_from(["F64", "F32", "F16", "BF16", "I64", "I32", "I8", "U8", "BOOL", "F7", "", 3]))
        assume(new != dtype)
        header[name]["dtype"] = new
        width = {"F64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2, "I64": 8, "I8": 1, "U8": 1, "BOOL": 1}
        same_width = width.get(new) == width.get(dtype)
        return kind, join(header, data), not same_width  # same width: a valid file of other values
    if kind == "shape lie":
        shape = header[name]["shape"]
        new = draw(st.sampled_from([shape[::-1], shape + [1], [math.prod(shape) + 1], [0] + shape, [], [-1] + shape,
                                    [2**62, 2**62], [str(d) for d in shape]]))  # fmt: skip
        assume(new != shape)
        header[name]["shape"] = new
        valid = all(isinstance(d, int) and d >= 0 for d in new) and math.prod(new) == math.prod(shape)
        return kind, join(header, data), not valid  # same element count: a valid file of other shapes
    if kind == "duplicate tensor":
        other = draw(st.sampled_from(names))
        text = json.dumps(header, separators=(",", ":"))
        entry = json.dumps(header[other] if draw(st.booleans()) else header[name], separators=(",", ":"))
        return kind, join(text[:-1] + f",{json.dumps(name)}:{entry}}}", data), True
    if kind == "overlapping tensor":
        begin, end = header[name]["data_offsets"]
        size = draw(st.integers(1, end - begin))
        header["extra.weight"] = {"dtype": "U8", "shape": [size], "data_offsets": [begin, begin + size]}
        return kind, join(header, data), True
    # non-UTF-8 name: raw bytes that are not UTF-8, or an escaped lone surrogate
    text = json.dumps(header, separators=(",", ":")).encode()
    bad = draw(st.sampled_from([b"\xff\xfe", b"\xc3", b"\xed\xa0\x80", b"\\udcff", b"\\ud800"]))
    return kind, join(text.replace(json.dumps(name).encode(), b'"' + bad + name.encode() + b'"', 1), data), True


@settings(FUZZ, max_examples=MUTATED_EXAMPLES)
@given(case=mutated())
def test_a_mutated_file_is_one_line_exit_2_and_leaves_nothing(case):
    kind, blob, must_refuse = case
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        source = folder / "model.safetensors"
        source.write_bytes(blob)
        before = files_in(folder)
        out, report = folder / "q.safetensors", folder / "q.json"
        result = invoke("quantize", source, "-o", out, "--json", report)
        event(f"{kind}: exit {result.exit_code}")
        if result.exit_code == 0 and not must_refuse:
            assert is_quantized_file(out), kind  # still a valid file: the output is whole
            return
        assert_refused(result, kind)
        assert files_in(folder) == before, kind  # no output, no temporary, the input untouched
        assert_refused(invoke("verify", source, "--backend", "torch", "--json", folder / "v.json"), kind)
        assert files_in(folder) == before, kind


@settings(FUZZ, max_examples=READER_EXAMPLES)
@given(case=mutated())
def test_the_reader_raises_only_checkpoint_errors(case):
    kind, blob, must_refuse = case
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.safetensors"
        path.write_bytes(blob)
        try:
            with open_checkpoint(path) as ckpt:
                infos = tensor_infos(ckpt)
                for name in infos:
                    ckpt.get_tensor(name)
        except CheckpointError:
            return
        assert not must_refuse, f"{kind}: read without an error"


def test_a_100_mb_header_is_refused_unread(tmp_path):
    """A header past safetensors' 100 MB limit (MAX_HEADER_BYTES): refused from its length alone,
    whether the file really holds it or only claims to."""
    header = json.dumps({"__metadata__": {"pad": "x" * 8}, "w": {"dtype": "U8", "shape": [8], "data_offsets": [0, 8]}})
    big = tmp_path / "big.safetensors"
    length = 100 << 20
    with open(big, "wb") as f:
        f.write(struct.pack("<Q", length) + header.encode())
        f.seek(8 + length - 1)
        f.write(b" ")  # a sparse file: the header, a hole to its 100 MiB length, the data
        f.write(b"\0" * 8)
    liar = tmp_path / "liar.safetensors"
    liar.write_bytes(struct.pack("<Q", length) + header.encode())
    for path in (big, liar):
        before = files_in(tmp_path) if path is liar else None
        result = invoke("quantize", path, "-o", tmp_path / "q.safetensors")
        assert_refused(result, path.name)
        assert "header length" in result.stderr
        if before is not None:
            assert files_in(tmp_path) == before


@pytest.mark.parametrize("dtype", ["U16", "U32", "U64"])
def test_a_tensor_of_a_dtype_gelugemm_does_not_read_is_one_checkpoint_error(tmp_path, dtype):
    """Found by the fuzz suite (one flipped header byte turned F32 into U32): a dtype the
    format allows but no reader here maps was a KeyError."""
    nbytes = {"U16": 2, "U32": 4, "U64": 8}[dtype] * 4
    header = json.dumps({"w": {"dtype": dtype, "shape": [4], "data_offsets": [0, nbytes]}}).encode()
    path = tmp_path / "model.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\1" * nbytes)
    with open_checkpoint(path) as ckpt, pytest.raises(CheckpointError, match=f"cannot read a {dtype} tensor"):
        ckpt.get_tensor("w")
