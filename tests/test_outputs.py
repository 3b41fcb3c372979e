"""Nothing the user had is lost: every output is checked before the work, written all or
nothing, and a write that fails (disk full, a file-size limit) is one line with nothing left.

calibration/outputs.py is the one place that does it; these tests drive it through each
command (quantize's -o and --json, verify's --json, bench's --json and --plot) and directly.
"""

import errno
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import calibration.outputs as outputs
import calibration.quantize as quantize_module
import gelugemm_cli.verify as verify_cli
from bench_helpers import synthetic_result
from calibration.errors import CheckpointError, OutputError
from calibration.quantized_file import is_quantized_file, sha256_file
from checkpoints import write_checkpoint
from cli_helpers import invoke, one_line_error

REPO = Path(__file__).resolve().parent.parent


pytestmark = pytest.mark.usefixtures("wide_consoles")


def snapshot(folder: Path) -> dict:
    """Every file under `folder` (hidden ones too: a temporary would show) and its sha256."""
    return {p.relative_to(folder): sha256_file(p) for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def model(tmp_path) -> Path:
    return write_checkpoint(tmp_path / "model.safetensors", "bert", config={"hidden_act": "gelu"})


def no_work(monkeypatch):
    """Make the work itself fail loudly: a refusal must come before it."""

    def refuse(*args, **kwargs):
        raise AssertionError("the work started before the output was checked")

    monkeypatch.setattr(quantize_module, "_quantize_layer", refuse)
    monkeypatch.setattr(verify_cli, "verify_checkpoint", refuse)


# ---- 1. an input is never an output ------------------------------------------------------------


def test_json_never_replaces_an_input(tmp_path, model, monkeypatch):
    """Issue 11, item 1: `--json in.safetensors` used to replace the checkpoint with a JSON file."""
    no_work(monkeypatch)
    before = snapshot(tmp_path)
    config = tmp_path / "config.json"  # read for the GELU flavour: an input too
    for args in (["quantize", model, "--json", model], ["quantize", model, "--json", model, "--force"],
                 ["verify", model, "--json", model, "--force"], ["quantize", model, "--json", config, "--force"]):  # fmt: skip
        assert "never overwrites its input" in one_line_error(invoke(*args)), args
    assert snapshot(tmp_path) == before


def test_no_json_replaces_a_file_of_a_model_directory(tmp_path, model, monkeypatch):
    """`verify DIR --json DIR/model.safetensors --force` used to replace the weights, and
    `inspect --json` was not checked at all: every file of an input directory is an input."""
    no_work(monkeypatch)
    model_dir = tmp_path / "dir"
    model_dir.mkdir()
    shutil.copy(model, model_dir / "model.safetensors")
    shutil.copy(tmp_path / "config.json", model_dir / "config.json")
    before = snapshot(tmp_path)
    for command in ("quantize", "verify", "inspect"):
        for target in (model_dir / "model.safetensors", model_dir / "config.json"):
            line = one_line_error(invoke(command, model_dir, "--json", target, "--force"))
            assert "never overwrites its input" in line, (command, target)
    assert "never overwrites its input" in one_line_error(invoke("inspect", model, "--json", model, "--force"))
    assert snapshot(tmp_path) == before
    # calibrate's -o and images are checked the same way (its model run needs transformers)
    with pytest.raises(OutputError, match="in the input directory"):
        outputs.check_output(model_dir / "model.safetensors", option="-o", inputs=[model_dir], force=True)
    # a report gelugemm wrote into the directory is its own: a re-run replaces it
    report = model_dir / "inspect.json"
    assert invoke("inspect", model_dir, "--json", report).exit_code == 0
    assert invoke("inspect", model_dir, "--json", report).exit_code == 0


def test_inspect_json_replaces_only_what_gelugemm_wrote_unless_forced(tmp_path, model):
    notes = tmp_path / "notes.json"
    notes.write_text('{"mine": true}\n')
    assert "not written by gelugemm; pass --force" in one_line_error(invoke("inspect", model, "--json", notes))
    assert notes.read_text() == '{"mine": true}\n'
    assert invoke("inspect", model, "--json", notes, "--force").exit_code == 0
    assert json.loads(notes.read_text())["tool"] == "gelugemm"
    assert invoke("inspect", model, "--json", notes).exit_code == 0  # its own JSON: a re-run replaces it


def test_an_input_is_known_by_inode_not_by_name(tmp_path, model, monkeypatch):
    no_work(monkeypatch)
    os.link(model, tmp_path / "hardlink.safetensors")
    (tmp_path / "symlink.safetensors").symlink_to(model)
    before = snapshot(tmp_path)
    for other in ("hardlink.safetensors", "symlink.safetensors"):
        line = one_line_error(invoke("quantize", model, "-o", tmp_path / other, "--force"))
        assert "never overwrites its input" in line and "the same file as the input" in line
        line = one_line_error(invoke("verify", model, "--json", tmp_path / other, "--force"))
        assert "never overwrites its input" in line
    assert snapshot(tmp_path) == before


def test_verify_json_never_replaces_the_recorded_source(tmp_path, model):
    quantized = tmp_path / "q.safetensors"
    assert invoke("quantize", model, "-o", quantized).exit_code == 0
    before = snapshot(tmp_path)
    # the reference verify would read: the source recorded in the quantized file
    line = one_line_error(invoke("verify", quantized, "--json", model, "--force"))
    assert "never overwrites its input" in line
    assert snapshot(tmp_path) == before


def test_json_and_the_checkpoint_are_never_the_same_file(tmp_path, model, monkeypatch):
    """`--json model.int8.safetensors` used to replace the checkpoint quantize had just written."""
    no_work(monkeypatch)
    before = snapshot(tmp_path)
    line = one_line_error(invoke("quantize", model, "--json", tmp_path / "model.int8.safetensors"))
    assert "is also the checkpoint output" in line
    line = one_line_error(invoke("quantize", model, "-o", tmp_path / "q.safetensors", "--json", tmp_path / "q.safetensors"))
    assert "is also the -o output" in line
    assert snapshot(tmp_path) == before


def test_output_that_is_a_directory_or_stdout_is_refused(tmp_path, model, monkeypatch):
    no_work(monkeypatch)
    (tmp_path / "folder").mkdir()
    before = snapshot(tmp_path)
    assert "is a directory" in one_line_error(invoke("quantize", model, "-o", tmp_path / "folder", "--force"))
    assert "is a directory" in one_line_error(invoke("verify", model, "--json", tmp_path / "folder", "--force"))
    # `-o -` used to write a file named "-"
    assert "give a file name" in one_line_error(invoke("quantize", model, "-o", "-"))
    assert snapshot(tmp_path) == before and not Path("-").exists()


def test_force_never_replaces_a_device_a_fifo_or_a_directory_gelugemm_did_not_write(tmp_path, model, monkeypatch):
    """The final rename used to replace a FIFO or a device node (as root, `--json /dev/null
    --force` would have destroyed /dev/null), and `-o DIR --force` a user's whole directory."""
    no_work(monkeypatch)
    os.mkfifo(tmp_path / "fifo")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    before = snapshot(tmp_path)
    for args in (["quantize", model, "-o", tmp_path / "fifo", "--force"], ["verify", model, "--json", tmp_path / "fifo", "--force"],
                 ["verify", model, "--json", "/dev/null", "--force"]):  # fmt: skip
        assert "is not a regular file" in one_line_error(invoke(*args)), args
    model_dir = tmp_path / "dir"
    model_dir.mkdir()
    shutil.copy(model, model_dir / "model.safetensors")
    shutil.copy(tmp_path / "config.json", model_dir / "config.json")
    line = one_line_error(invoke("quantize", model_dir, "-o", mine, "--force"))
    assert "is not a checkpoint directory gelugemm wrote" in line
    assert (mine / "notes.txt").read_text() == "keep" and (tmp_path / "fifo").is_fifo()
    assert {k: v for k, v in snapshot(tmp_path).items() if k.parts[0] != "dir"} == before
    # an empty directory, or one quantize wrote, is replaced
    (tmp_path / "empty").mkdir()
    monkeypatch.undo()
    assert invoke("quantize", model_dir, "-o", tmp_path / "empty", "--force").exit_code == 0
    assert invoke("quantize", model_dir, "-o", tmp_path / "empty", "--force", "--scheme", "w8a8").exit_code == 0


def test_a_dangling_symlink_needs_force_and_a_name_too_long_is_refused_before_the_work(tmp_path, model, monkeypatch):
    no_work(monkeypatch)
    (tmp_path / "link.json").symlink_to(tmp_path / "nowhere")
    line = one_line_error(invoke("verify", model, "--json", tmp_path / "link.json"))
    assert "a symlink to a missing file" in line and "--force" in line
    line = one_line_error(invoke("verify", model, "--json", tmp_path / ("a" * 300 + ".json")))
    assert "File name too long" in line


def test_json_replaces_only_what_gelugemm_wrote_unless_forced(tmp_path, model):
    notes = tmp_path / "notes.json"
    notes.write_text('{"mine": true}\n')
    line = one_line_error(invoke("verify", model, "--dtype", "fp16", "--json", notes))
    assert "not written by gelugemm; pass --force" in line
    assert notes.read_text() == '{"mine": true}\n'
    # --force replaces it; from then on it is gelugemm's own JSON, replaced by a re-run
    assert invoke("verify", model, "--dtype", "fp16", "--json", notes, "--force").exit_code == 0
    assert json.loads(notes.read_text())["tool"] == "gelugemm"
    assert invoke("verify", model, "--dtype", "bf16", "--json", notes).exit_code == 0
    assert json.loads(notes.read_text())["dtypes"] == ["bf16"]


def test_quantize_output_needs_force_to_be_replaced(tmp_path, model):
    out = tmp_path / "q.safetensors"
    out.write_bytes(b"keep me")
    assert "exists; pass --force" in one_line_error(invoke("quantize", model, "-o", out))
    assert out.read_bytes() == b"keep me"
    assert invoke("quantize", model, "-o", out, "--force").exit_code == 0 and is_quantized_file(out)


def test_bench_outputs_checked_before_the_run(tmp_path, model, monkeypatch):
    import kernels.bench as bench

    monkeypatch.setattr(bench, "run_bench", lambda *a, **k: pytest.fail("bench ran before its outputs were checked"))
    (tmp_path / "plot.png").write_bytes(b"\x89PNG\r\n\x1a\n not ours")
    before = snapshot(tmp_path)
    cases = {
        "never overwrites its input": ["bench", model, "--json", model, "--force"],
        "is also the --plot output": ["bench", "--json", tmp_path / "x.png", "--plot", tmp_path / "x.png"],
        "not written by gelugemm; pass --force": ["bench", "--plot", tmp_path / "plot.png"],
        "does not exist": ["bench", "--json", tmp_path / "missing" / "b.json"],
    }
    for message, args in cases.items():
        assert message in one_line_error(invoke(*args)), args
    assert snapshot(tmp_path) == before


# ---- 2, 3. the directory must exist and take the file: checked before the work --------------


def test_json_into_a_missing_directory_fails_before_the_work(tmp_path, model, monkeypatch):
    """Issue 11, item 3: a traceback after the work, and verify's verdict replaced by exit 1."""
    no_work(monkeypatch)
    before = snapshot(tmp_path)
    for command in (["quantize", model], ["verify", model]):
        line = one_line_error(invoke(*command, "--json", tmp_path / "nowhere" / "r.json"))
        assert "directory" in line and "does not exist" in line
    assert "does not exist" in one_line_error(invoke("quantize", model, "-o", tmp_path / "nowhere" / "q.safetensors"))
    assert snapshot(tmp_path) == before


def test_a_read_only_file_system_is_refused_before_the_work(tmp_path, model, monkeypatch):
    """Issue 11, item 2 (a traceback after the whole quantization). Simulated: statvfs reports
    the read-only mount flag for the output's directory (tests run as root, and no read-only
    mount can be made here)."""
    no_work(monkeypatch)
    out_dir = tmp_path / "mounted"
    out_dir.mkdir()
    real = os.statvfs

    class ReadOnly:
        def __init__(self, st):
            self._st = st
            self.f_flag = st.f_flag | os.ST_RDONLY

        def __getattr__(self, name):
            return getattr(self._st, name)

    monkeypatch.setattr(os, "statvfs", lambda p: ReadOnly(real(p)) if Path(p) == out_dir else real(p))
    for args in (["quantize", model, "-o", out_dir / "q.safetensors"], ["verify", model, "--json", out_dir / "r.json"]):
        assert "read-only file system" in one_line_error(invoke(*args))
    assert list(out_dir.iterdir()) == []


def test_a_directory_without_write_permission_is_refused_before_the_work(tmp_path, model, monkeypatch):
    """Simulated: os.access says no (what it says to a user without write permission; root,
    which runs these tests, may write anywhere)."""
    no_work(monkeypatch)
    locked = tmp_path / "locked"
    locked.mkdir()
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == locked else real(p, mode, **kw))
    for args in (["quantize", model, "-o", locked / "q.safetensors"], ["verify", model, "--json", locked / "r.json"]):
        assert "no permission to write" in one_line_error(invoke(*args))
    assert list(locked.iterdir()) == []


def test_too_little_free_space_is_refused_before_the_work(tmp_path, model, monkeypatch):
    no_work(monkeypatch)
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    before = snapshot(tmp_path)
    line = one_line_error(invoke("quantize", model))
    assert "needs about" in line and "1000 B free" in line
    assert snapshot(tmp_path) == before


# ---- a write that fails: one line, nothing left ------------------------------------------------


def test_disk_full_mid_write_is_one_line_and_leaves_nothing(tmp_path, model, monkeypatch):
    """ENOSPC while the checkpoint streams out (simulated: the write raises it after a first
    block, as a full disk does)."""
    real = quantize_module.write_stream

    def fills_up(f, plan, tensors, metadata, final_metadata=None):
        f.write(b"x" * 4096)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(quantize_module, "write_stream", fills_up)
    before = snapshot(tmp_path)
    line = one_line_error(invoke("quantize", model, "--scheme", "w8a8"))
    assert "cannot write" in line and "no space left on the device (ENOSPC)" in line
    assert snapshot(tmp_path) == before
    # ...and at fsync, where a network or delayed-allocation file system reports it
    monkeypatch.setattr(quantize_module, "write_stream", real)
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left on device")))
    assert "ENOSPC" in one_line_error(invoke("quantize", model))
    assert snapshot(tmp_path) == before


def test_disk_full_writing_json_keeps_verify_honest(tmp_path, model, monkeypatch):
    real_fdopen = os.fdopen

    class Full:
        def __init__(self, f):
            self._f = f

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, name):
            return getattr(self._f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self._f.close()

    monkeypatch.setattr(os, "fdopen", lambda *a, **k: Full(real_fdopen(*a, **k)))
    before = snapshot(tmp_path)
    line = one_line_error(invoke("verify", model, "--dtype", "fp16", "--json", tmp_path / "r.json"))
    assert "cannot write" in line and "ENOSPC" in line
    assert snapshot(tmp_path) == before


def test_a_file_size_limit_is_one_line_and_leaves_nothing(tmp_path):
    """EFBIG for real: the CLI runs under `ulimit -f` (RLIMIT_FSIZE) smaller than its output.
    The kernel sends SIGXFSZ, which used to kill the process (no message, a partial file
    left); gelugemm ignores it, so the write fails with EFBIG and is reported."""
    model = write_checkpoint(tmp_path / "model.safetensors", "bert", d_model=64, d_ff=256)
    limit = 64 << 10
    assert model.stat().st_size > 2 * limit

    def limited():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONDONTWRITEBYTECODE": "1", "COLUMNS": "400"}
    before = snapshot(tmp_path)
    done = subprocess.run([sys.executable, "-m", "gelugemm_cli", "quantize", str(model)], capture_output=True,
                          text=True, env=env, preexec_fn=limited, timeout=120)  # fmt: skip
    assert done.returncode == 2, (done.returncode, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "file too large (EFBIG" in lines[0], done.stderr
    assert snapshot(tmp_path) == before


# ---- the writer and the checks, directly -------------------------------------------------------


def test_atomic_output_leaves_the_old_file_until_the_end(tmp_path):
    path = tmp_path / "out.bin"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with outputs.atomic_output(path) as f:
            f.write(b"new, half")
            assert path.read_bytes() == b"old"  # until the block ends, the old file is there
            raise RuntimeError("the work failed")
    assert path.read_bytes() == b"old" and sorted(tmp_path.iterdir()) == [path]
    with outputs.atomic_output(path) as f:
        f.write(b"new")
    assert path.read_bytes() == b"new" and sorted(tmp_path.iterdir()) == [path]
    assert path.stat().st_mode & 0o777 == 0o666 & ~_umask()  # a new file's usual mode, not mkstemp's 0600


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_atomic_output_writes_and_replaces_a_directory(tmp_path):
    """For directory outputs (a model directory): filled under a temporary name, renamed at the end;
    with force an existing one that gelugemm wrote is replaced, and kept whole when the new one fails."""
    from safetensors.torch import save_file

    def shard(folder: Path, name: str) -> None:  # what makes a directory gelugemm's: its record
        save_file({"t": torch.ones(2)}, folder / name, metadata={"gelugemm": "{}"})

    out = tmp_path / "model-int8"
    outputs.check_output(out, directory=True)
    with outputs.atomic_output(out, directory=True) as tmp:
        shard(tmp, "a.safetensors")
        assert not out.exists()
    assert sorted(p.name for p in out.iterdir()) == ["a.safetensors"]
    with pytest.raises(CheckpointError, match="exists; pass --force"):
        outputs.check_output(out, directory=True)
    outputs.check_output(out, directory=True, force=True)
    with pytest.raises(RuntimeError):
        with outputs.atomic_output(out, directory=True) as tmp:
            shard(tmp, "b.safetensors")
            raise RuntimeError("failed")
    assert sorted(p.name for p in out.iterdir()) == ["a.safetensors"]
    with outputs.atomic_output(out, directory=True) as tmp:
        shard(tmp, "b.safetensors")
    assert sorted(p.name for p in out.iterdir()) == ["b.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model-int8"]
    # a directory of anything else is never replaced
    (out / "b.safetensors").unlink()
    (out / "notes.txt").write_text("keep")
    with pytest.raises(CheckpointError, match="not a checkpoint directory gelugemm wrote"):
        outputs.check_output(out, directory=True, force=True)


def test_a_directory_output_never_holds_an_input(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    source = write_checkpoint(out / "model.safetensors", "bert")
    with pytest.raises(OutputError, match="holds the input"):
        outputs.check_output(out, inputs=[source], directory=True, force=True)
    with pytest.raises(OutputError, match="exists and is not a directory"):
        outputs.check_output(source, directory=True, force=True)


def test_interrupted_says_what_is_on_disk(tmp_path):
    outputs.start_run()
    a, b = tmp_path / "a.bin", tmp_path / "b.json"
    outputs.check_output(a)
    outputs.check_output(b)
    code, line = outputs.interrupted(signal.SIGTERM)
    assert code == 143 and "nothing written" in line
    with outputs.atomic_output(a) as f:
        f.write(b"a")
    code, line = outputs.interrupted(signal.SIGHUP)
    assert code == 129 and "kept" in line and str(b) in line and "not written" in line
    outputs.set_result(1)
    outputs.write_json(b, {"x": 1})
    assert outputs.interrupted(signal.SIGINT)[0] == 1  # every output in place: the command's own result
    outputs.start_run()


def stamped(document: dict) -> bool:
    return list(document)[:2] == ["tool", "schema_version"] and document["tool"] == "gelugemm" and (
        document["schema_version"] == outputs.JSON_SCHEMA_VERSION
    )


def test_every_json_is_stamped_with_tool_and_schema_version(tmp_path, model):
    quantize_json, verify_json = tmp_path / "q.json", tmp_path / "v.json"
    assert invoke("quantize", model, "--json", quantize_json).exit_code == 0
    assert invoke("verify", model, "--dtype", "fp16", "--json", verify_json).exit_code == 0
    stdout = invoke("verify", model, "--dtype", "fp16", "--json", "-")
    for document in (json.loads(quantize_json.read_text()), json.loads(verify_json.read_text()), json.loads(stdout.stdout)):
        assert stamped(document), list(document)[:3]
    assert outputs.is_own_file(quantize_json) and outputs.is_own_file(verify_json)
    assert not outputs.is_own_file(model)


def test_bench_json_is_stamped_too(tmp_path, cpu_run):
    path = tmp_path / "b.json"
    args = ["bench", "--shape", "32,64", "--dtype", "fp16", "--tokens", "3", "--peers", "eager", "--json", path]
    assert invoke(*args).exit_code == 0
    assert stamped(json.loads(path.read_text()))


def test_the_plot_is_tagged_and_replaced_by_a_rerun(tmp_path):
    pytest.importorskip("matplotlib")
    from gelugemm_cli import bench as bench_cli

    path = tmp_path / "speedup.png"
    bench_cli.write_speedup_plot(synthetic_result(), path)
    assert outputs.is_own_file(path)
    outputs.check_output(path, option="--plot", replace="own")  # a re-run replaces it without --force
    path.write_bytes(path.read_bytes().replace(b"Software", b"Softwarx"))
    with pytest.raises(OutputError, match="not written by gelugemm"):
        outputs.check_output(path, option="--plot", replace="own")


def test_sizes_read_as_a_person_would():
    assert [outputs.size_text(n) for n in (0, 812, 12_600, 4_400_000, 91 << 20, 3 << 30)] == [
        "0 B", "812 B", "12.3 KiB", "4.2 MiB", "91.0 MiB", "3.0 GiB",
    ]  # fmt: skip
