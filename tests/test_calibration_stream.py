"""calibration/safetensors_stream.py: a file written one tensor at a time reads back with safetensors."""

import io

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from calibration.checkpoint import TensorInfo
from calibration.safetensors_stream import DTYPE_NAMES, write_stream


def plan_of(tensors: dict[str, torch.Tensor]) -> dict[str, TensorInfo]:
    return {name: TensorInfo(DTYPE_NAMES[t.dtype], tuple(t.shape)) for name, t in tensors.items()}


def test_every_dtype_and_shape_reads_back(tmp_path):
    tensors = {
        "f32": torch.randn(3, 5),
        "bf16": torch.randn(7).bfloat16(),
        "f16": torch.randn(2, 2, 2).half(),
        "f64": torch.randn(4, dtype=torch.float64),
        "i8": torch.randint(-127, 128, (6, 3), dtype=torch.int8),
        "i64": torch.arange(5),
        "bool": torch.tensor([True, False, True]),
        "f8": torch.randn(9).to(torch.float8_e4m3fn),
        "scalar": torch.tensor(0.25),
        "empty": torch.zeros(0, 4),
        "transposed view": torch.randn(4, 6).t(),  # not contiguous
    }
    path = tmp_path / "out.safetensors"
    with open(path, "wb") as f:
        written = write_stream(f, plan_of(tensors), iter(tensors.items()), {"note": "streamed"})
    assert written == path.stat().st_size
    back = load_file(str(path))
    assert back.keys() == tensors.keys()
    for name, t in tensors.items():
        assert back[name].dtype == t.dtype and back[name].shape == t.shape, name
        as_bytes = lambda x: x.contiguous().reshape(-1).view(torch.uint8)  # noqa: E731
        assert torch.equal(as_bytes(back[name]), as_bytes(t)), name
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {"note": "streamed"}
    assert (int.from_bytes(path.read_bytes()[:8], "little") + 8) % 8 == 0  # data starts 8-byte aligned


@pytest.mark.parametrize(
    "stream",
    [
        [("b", torch.zeros(2)), ("a", torch.zeros(2))],  # out of order
        [("a", torch.zeros(3)), ("b", torch.zeros(2))],  # wrong shape
        [("a", torch.zeros(2, dtype=torch.float16)), ("b", torch.zeros(2))],  # wrong dtype
        [("a", torch.zeros(2))],  # ends early
        [("a", torch.zeros(2)), ("b", torch.zeros(2)), ("c", torch.zeros(2))],  # one too many
    ],
)
def test_a_stream_that_strays_from_its_plan_is_a_bug(stream):
    plan = {"a": TensorInfo("F32", (2,)), "b": TensorInfo("F32", (2,))}
    with pytest.raises(RuntimeError, match="tensor stream"):
        write_stream(io.BytesIO(), plan, iter(stream), {})


class FailingFile(io.BytesIO):
    """A file whose writes fail after the first `good` ones, as a full disk does."""

    def __init__(self, good: int):
        super().__init__()
        self.good = good

    def write(self, data):
        if self.good == 0:
            raise OSError(28, "No space left on device")
        self.good -= 1
        return super().write(data)


@pytest.mark.parametrize("good", [1, 3, 5])  # the header and 0, 2 or 4 tensors
def test_a_write_that_fails_in_the_writer_thread_is_raised(good):
    tensors = {f"t{i}": torch.randn(64) for i in range(6)}
    with pytest.raises(OSError, match="No space left"):
        write_stream(FailingFile(good), plan_of(tensors), iter(tensors.items()), {})


def test_writes_run_in_order_behind_the_stream():
    """Each tensor is handed to the writer as it comes, and the bytes land in plan order."""
    tensors = {f"t{i}": torch.full((1000,), float(i)) for i in range(8)}
    produced = []

    def stream():
        for name, t in tensors.items():
            produced.append(name)
            yield name, t

    out = io.BytesIO()
    written = write_stream(out, plan_of(tensors), stream(), {})
    data = out.getvalue()
    assert written == len(data)
    body = torch.frombuffer(bytearray(data[-8 * 4000 :]), dtype=torch.float32).view(8, 1000)
    assert torch.equal(body, torch.arange(8.0)[:, None].expand(8, 1000)) and produced == list(tensors)


def test_reads_into_one_buffer_are_the_tensors_and_reuse_its_memory(tmp_path):
    """quantize reads each float weight into one ReadBuffer: the same values as a plain read,
    the same memory each time (grown when a larger tensor comes)."""
    from calibration.safetensors_stream import ReadBuffer, read_header, read_stored

    tensors = {"small": torch.randn(3, 5).half(), "big": torch.randn(40, 7), "mid": torch.randn(6).bfloat16()}
    path = tmp_path / "t.safetensors"
    with open(path, "wb") as f:
        write_stream(f, plan_of(tensors), iter(tensors.items()), {})
    stored, _ = read_header(path)
    buffer = ReadBuffer()
    first = read_stored(stored["small"], buffer=buffer)
    assert torch.equal(first, tensors["small"]) and first.dtype == torch.float16
    big = read_stored(stored["big"], buffer=buffer)  # larger: the buffer grows
    assert torch.equal(big, tensors["big"]) and torch.equal(big, read_stored(stored["big"]))
    mid = read_stored(stored["mid"], buffer=buffer)
    assert torch.equal(mid, tensors["mid"]) and mid.data_ptr() == big.data_ptr()  # the same memory


def test_final_metadata_rewrites_the_header_in_place(tmp_path):
    # quantize writes placeholders of a digest's length, and the digests once the data is out
    tensors = {"a": torch.randn(3, 4), "b": torch.randint(-127, 128, (5,), dtype=torch.int8)}
    path = tmp_path / "out.safetensors"
    with open(path, "wb") as f:
        written = write_stream(f, plan_of(tensors), iter(tensors.items()), {"digest": "0" * 64},
                               lambda: {"digest": "ab" * 32})  # fmt: skip
    assert written == path.stat().st_size
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {"digest": "ab" * 32}
    back = load_file(str(path))
    assert all(torch.equal(back[name], t) for name, t in tensors.items())


def test_final_metadata_of_another_length_is_refused():
    tensors = {"a": torch.randn(2)}
    with pytest.raises(RuntimeError, match="changes the header's length"):
        write_stream(io.BytesIO(), plan_of(tensors), iter(tensors.items()), {"digest": "0" * 64}, lambda: {"digest": "0" * 72})
