"""Every file gelugemm writes: checked before any work, written all or nothing, removed on a signal.

    out = check_output(path, option="--json", inputs=[checkpoint], expected_bytes=2**20,
                       force=force, replace="own")          # before the work: exit 2 here, not after it
    ...                                                      # the work
    with atomic_output(out) as f:                            # a temporary file beside `out`
        f.write(data)                                        # renamed into place when the block ends
    write_json(out, report.to_dict())                        # the same, for a command's --json

    with atomic_output(out_dir, directory=True) as tmp_dir:  # a directory output: fill tmp_dir,
        save_file(tensors, tmp_dir / "model.safetensors")    # it is renamed to out_dir at the end

Guarantees, each tested (tests/test_outputs.py, tests/test_signals.py):

- `check_output` refuses, before anything is written: an output that is one of the inputs (the
  same file by device and inode, whatever its name or link), a directory where a file is
  written (or a directory output that holds an input), `-`, a missing or read-only directory,
  a directory without write permission, too little free space for `expected_bytes`, an output
  named twice in one run, and an existing file unless `force` (or, with replace="own", a file
  gelugemm wrote itself: a JSON stamped by `json_document`, a PNG tagged "Software: gelugemm").
- `atomic_output` writes under a temporary name (`.NAME.XXXXXX.partial`) in the destination's
  directory, fsyncs, and renames into place (`os.replace`: readers see the old file or the
  new one, never a part). Until the rename the destination is untouched. On any error or
  signal the temporary is removed; a write that fails (disk full: ENOSPC; a file-size limit:
  EFBIG; a read-only file system, ...) is an `OutputError`, one line, exit 2. `force`
  replaces through the same rename.
- Every temporary is registered here while it exists, so the CLI's signal handling
  (gelugemm_cli/common.py) can remove what an interrupted run left and say what is complete:
  `interrupted()` gives the exit code and the line to print.

The registry is per process and per command run (`start_run`); a library caller that never
calls it gets the same files and checks, and the registry simply grows with what it wrote.
Test-only pause points (`GELUGEMM_TEST_PAUSE=mid-write|after-rename`, see `test_pause`) let
the signal tests stop the writer at a known point instead of guessing with timers.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import stat
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Iterable, Iterator

from calibration.errors import OutputError
from calibration.quantized_file import RECORD_KEY
from calibration.safetensors_header import HeaderError, read_header
from kernels.version import __version__

TOOL = "gelugemm"
# The version of the layout of gelugemm's JSON (--json of every command). Bumped when a key
# is removed, renamed or changes meaning; adding keys does not bump it (README: "JSON output").
JSON_SCHEMA_VERSION = 1
PNG_SOFTWARE = f"{TOOL} {__version__}"  # the tEXt "Software" entry of a PNG gelugemm writes

TEMP_SUFFIX = ".partial"
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))
PAUSE_ENV, PAUSE_MARKER_ENV = "GELUGEMM_TEST_PAUSE", "GELUGEMM_TEST_PAUSE_MARKER"
_OWN_FILE_LIMIT = 64 << 20  # a file larger than this is not a JSON or PNG gelugemm wrote


# ---- sizes -------------------------------------------------------------------------------------


def size_text(n: int | None) -> str:
    """812 B, 12.3 KiB, 4.2 MiB, 1.3 GiB: never "0 MiB" for a small file."""
    if n is None:
        return "?"
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            value = n / scale
            return f"{value:.1f} {unit}" if value < 100 else f"{value:.0f} {unit}"
    return f"{n} B"


# ---- the run's registry ------------------------------------------------------------------------


@dataclass
class _Run:
    planned: list[Path] = field(default_factory=list)  # checked by check_output, in order
    written: list[Path] = field(default_factory=list)  # renamed into place
    temporaries: list[Path] = field(default_factory=list)  # on disk now, removed on a signal
    result: int = 0  # the command's own exit code once every planned output is written


_run = _Run()


def start_run() -> None:
    """Forget the previous command's outputs (the CLI calls this as each command starts)."""
    global _run
    _run = _Run()


def set_result(code: int) -> None:
    """The exit code the command ends with (0, or verify's 1 for a failed row) once its outputs
    are written: a signal that arrives after that keeps it."""
    _run.result = code


def planned_outputs() -> list[Path]:
    return list(_run.planned)


def written_outputs() -> list[Path]:
    return list(_run.written)


def remove_temporaries(paths: list[Path] | None = None) -> list[Path]:
    """Remove registered temporaries (files or directories; all of them for None) and forget
    them; returns what was removed. Safe to call from a signal handler, or twice."""
    removed = []
    for tmp in list(_run.temporaries if paths is None else paths):
        try:
            if tmp.is_dir() and not tmp.is_symlink():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink(missing_ok=True)
            removed.append(tmp)
        except OSError:
            pass
        if tmp in _run.temporaries:
            _run.temporaries.remove(tmp)
    return removed


def interrupted(signum: int) -> tuple[int, str]:
    """After a signal: remove the temporaries; (exit code, one line saying what is on disk).

    Every output the command planned already in place: the command's own result (it finished
    its work; the signal came after). Otherwise 128 + the signal number: 130 SIGINT, 143
    SIGTERM, 129 SIGHUP, with the complete outputs named (they stay) and no partial one left.
    """
    remove_temporaries()
    try:
        name = signal.Signals(signum).name
    except ValueError:
        name = f"signal {signum}"
    written = [str(p) for p in _run.written]
    pending = [str(p) for p in _run.planned if p not in _run.written]
    if _run.written and not pending:
        return _run.result, f"{name} after {_and(written)} {'was' if len(written) == 1 else 'were'} written; kept, complete"
    if written:
        return 128 + signum, f"{name}: stopped; kept {_and(written)} (complete); {_and(pending)} not written, no partial file left"
    return 128 + signum, f"{name}: stopped; nothing written, no partial file left"


def _and(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


@contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM/SIGHUP until the block ends (a rename and its bookkeeping are one step)."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def test_pause(point: str) -> None:
    """Test-only: with GELUGEMM_TEST_PAUSE=point, write the file named by GELUGEMM_TEST_PAUSE_MARKER
    and wait (at most a minute) so a test can signal the process exactly here.

    Points: "mid-write" (the temporary is written, not yet renamed), "after-rename" (the output is
    in place, the command not finished); gelugemm_cli/entry.py has "import" (torch loading).
    """
    if os.environ.get(PAUSE_ENV) != point:
        return
    marker = os.environ.get(PAUSE_MARKER_ENV)
    if marker:
        Path(marker).write_text(f"{os.getpid()} {point}\n")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        time.sleep(0.01)


test_pause.__test__ = False  # not a pytest test, whatever its name


# ---- checking an output before the work --------------------------------------------------------


def _same_file(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _stat(path: Path) -> os.stat_result | None:
    try:
        return path.stat()
    except OSError:
        return None


def _lstat(path: Path, option: str) -> os.stat_result | None:
    """The output path's own entry (a dangling symlink exists), None where there is none; a
    name the file system cannot hold is refused here, before any work."""
    try:
        return path.lstat()
    except FileNotFoundError:
        return None
    except OSError as exc:  # ENAMETOOLONG, ELOOP, ENOTDIR, EACCES: it could not be written either
        raise OutputError(f"{option} {path}: {exc.strerror}") from None


def _where(path: Path) -> Path:
    """The absolute path a not-yet-existing output will have (its directory resolved)."""
    path = Path(os.path.abspath(path))
    return Path(os.path.realpath(path.parent)) / path.name


def _is_within(inner: Path, outer: Path) -> bool:
    inner, outer = Path(os.path.realpath(inner)), Path(os.path.realpath(outer))
    return inner == outer or outer in inner.parents


def check_output(
    path: str | Path,
    *,
    option: str = "output",
    inputs: Iterable[str | Path | None] = (),
    others: Iterable[tuple[str, str | Path | None]] = (),
    expected_bytes: int = 0,
    force: bool = False,
    replace: str = "force",
    directory: bool = False,
) -> Path:
    """Refuse an output path that cannot or must not be written; call before any work.

    option: how the message names it ("-o", "--json", "output").
    inputs: the files (or directories) the command reads; none may be the output.
    others: (option, path) of the run's other outputs; none may be this one.
    expected_bytes: what the output will take (at most); the free space must hold it.
    force: replace an existing output. replace="own": a file gelugemm wrote (a stamped JSON,
        a tagged PNG) is replaced without force; "force": any existing file needs force.
    directory: the output is a directory (written with atomic_output(..., directory=True)).
    Registers the path as one of this run's planned outputs; returns it as a Path.
    """
    if path is None or str(path) in ("", "-"):
        raise OutputError(f"{option} {str(path) or repr('')}: give a file name (gelugemm does not write this output to stdout)")
    path = Path(path)
    what = "directory" if directory else "file"
    entry = _lstat(path, option)
    st = _stat(path) if entry is not None else None
    if entry is not None and st is None:  # a symlink to nothing: writing replaces the link
        if not force:
            raise OutputError(f"{option} {path} exists (a symlink to a missing file); pass --force to replace it")
    if st is not None:
        for source in filter(None, inputs):
            source_st = _stat(Path(source))
            if source_st is not None and _same_file(st, source_st):
                same = "" if _where(path) == _where(Path(source)) else f" (the same file as the input {source})"
                raise OutputError(f"{option} {path} is the input{same}; gelugemm never overwrites its input")
            if directory and stat.S_ISDIR(st.st_mode) and _is_within(Path(source), path):
                raise OutputError(f"{option} {path} holds the input {source}; gelugemm never overwrites its input")
            # A file inside an input directory (a model's shard, index or config, an image) is
            # read as part of it; only a file gelugemm wrote there itself may be replaced.
            if (source_st is not None and stat.S_ISDIR(source_st.st_mode) and not stat.S_ISDIR(st.st_mode)
                    and _is_within(path, Path(source)) and not is_own_file(path)):  # fmt: skip
                raise OutputError(f"{option} {path} is in the input directory {source}; gelugemm never overwrites its input")
        if directory and not stat.S_ISDIR(st.st_mode):
            raise OutputError(f"{option} {path} exists and is not a directory")
        if not directory and stat.S_ISDIR(st.st_mode):
            raise OutputError(f"{option} {path} is a directory; give a file name")
        if not directory and not stat.S_ISREG(st.st_mode):
            # A device, FIFO or socket: the write's final rename would replace the node itself.
            raise OutputError(
                f"{option} {path} is not a regular file (a device, FIFO or socket); give a file name "
                "('-' for stdout, where the option takes it)"
            )
        if directory and not _is_own_directory(path):
            raise OutputError(
                f"{option} {path} exists and is not a checkpoint directory gelugemm wrote; it is never replaced, "
                "with or without --force: remove it yourself or choose another output"
            )
        if not force:
            if replace == "own" and is_own_file(path):
                pass  # a JSON or PNG gelugemm wrote: replaced as a re-run expects
            elif replace == "own":
                raise OutputError(f"{option} {path} exists and was not written by gelugemm; pass --force to replace it")
            else:
                raise OutputError(f"{option} {path} exists; pass --force to replace it")
    for other_option, other in others:
        if other is not None and str(other) != "-" and _where(path) == _where(Path(other)):
            raise OutputError(f"{option} {path} is also the {other_option} output; give each output its own name")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.exists():
        raise OutputError(f"{option} {path}: directory {parent} does not exist")
    if not parent.is_dir():
        raise OutputError(f"{option} {path}: {parent} is not a directory")
    if _read_only_fs(parent):
        raise OutputError(f"{option} {path}: {parent} is on a read-only file system")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"{option} {path}: no permission to write in {parent}")
    free = shutil.disk_usage(parent).free
    if expected_bytes > free:
        raise OutputError(
            f"{option} {path}: the {what} needs about {size_text(expected_bytes)}; {parent} has {size_text(free)} free"
        )
    if _where(path) not in _run.planned:
        _run.planned.append(_where(path))
    return path


def _read_only_fs(directory: Path) -> bool:
    try:
        return bool(os.statvfs(directory).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):  # no statvfs (Windows): the write itself will say
        return False


# ---- writing -----------------------------------------------------------------------------------

# errno values that mean "this write cannot succeed here": one line, not a traceback.
_WRITE_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EROFS, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EIO}
_WHY = {errno.ENOSPC: "no space left on the device (ENOSPC)", errno.EDQUOT: "disk quota exceeded (EDQUOT)",
        errno.EFBIG: "file too large (EFBIG: a file-size limit, ulimit -f?)",
        errno.EROFS: "read-only file system (EROFS)"}  # fmt: skip


def _write_error(path: Path, exc: OSError) -> OutputError:
    why = _WHY.get(exc.errno) or exc.strerror or str(exc)
    return OutputError(f"cannot write {path}: {why}; nothing written, no partial file left")


def _ours(exc: OSError, tmp: Path) -> bool:
    """An OSError raised while the caller wrote: from the write itself (no file name, or one
    under the temporary), not from a read of some input."""
    if exc.filename is None:
        return exc.errno in _WRITE_ERRNOS
    return _is_within(Path(os.fsdecode(exc.filename)), tmp)


def _new_file_mode(directory: bool) -> int:
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask  # mkstemp makes 0600, mkdtemp 0700


def _fsync_path(path: Path, directory: bool) -> None:
    fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for folder, _, files in os.walk(root):
        for name in files:
            _fsync_path(Path(folder) / name, directory=False)
        _fsync_path(Path(folder), directory=True)


@contextmanager
def atomic_output(path: str | Path, *, directory: bool = False, text: bool = False) -> Iterator:
    """Write `path` all or nothing: yields an open file (binary; text=True for str, UTF-8) or,
    with directory=True, the Path of an empty temporary directory to fill.

    The temporary sits beside `path` (same file system, so the final rename is atomic) and is
    registered for removal on a signal. When the block ends it is flushed, fsynced, given a new
    file's usual mode and renamed over `path` (an existing directory output is moved aside and
    removed after the rename). An exception in the block, or a failed write, removes it and
    leaves `path` as it was; OSErrors of the write become one-line OutputErrors.
    Call `check_output` first: this does not refuse anything itself.
    """
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    try:
        with signals_deferred():  # created and registered as one step: a signal cannot leak it
            if directory:
                tmp = Path(tempfile.mkdtemp(dir=parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX))
            else:
                fd, name = tempfile.mkstemp(dir=parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
                tmp = Path(name)
            _run.temporaries.append(tmp)
    except OSError as exc:
        raise _write_error(path, exc) from None
    try:
        if directory:
            yield tmp
            _fsync_tree(tmp)
        else:
            with os.fdopen(fd, "w" if text else "wb", **({"encoding": "utf-8"} if text else {})) as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
        os.chmod(tmp, _new_file_mode(directory))
        test_pause("mid-write")
        _move_into_place(tmp, path, directory)
    except BaseException as exc:
        if tmp in _run.temporaries:
            remove_temporaries([tmp])
        if isinstance(exc, OSError) and _ours(exc, tmp):
            raise _write_error(path, exc) from None
        raise
    try:
        _fsync_path(parent, directory=True)  # the rename itself, durable; best effort
    except OSError:
        pass
    test_pause("after-rename")


def _move_into_place(tmp: Path, path: Path, directory: bool) -> None:
    """Rename tmp to path; the rename and its bookkeeping happen with signals held."""
    with signals_deferred():
        if not (directory and path.is_dir() and not path.is_symlink()):
            os.replace(tmp, path)
            old = None
        else:
            # os.replace cannot replace a non-empty directory: move the old one aside, rename,
            # and put it back if the rename fails.
            old = Path(tempfile.mkdtemp(dir=tmp.parent, prefix=f".{path.name}.", suffix=".old"))
            os.rename(path, old / path.name)
            try:
                os.rename(tmp, path)
            except OSError:
                os.rename(old / path.name, path)
                old.rmdir()
                raise
            _run.temporaries.append(old)
        _run.temporaries.remove(tmp)
        _run.written.append(_where(path))
    if old is not None:
        remove_temporaries([old])


# ---- files gelugemm wrote ----------------------------------------------------------------------


def json_document(payload: dict) -> dict:
    """A command's result as gelugemm writes it: `tool` and `schema_version` first, then the payload."""
    return {"tool": TOOL, "schema_version": JSON_SCHEMA_VERSION, **payload}


def json_text(payload: dict) -> str:
    return json.dumps(json_document(payload), indent=2, default=str) + "\n"


def write_json(path: str | Path, payload: dict) -> None:
    """Write a command's result as a stamped JSON document, all or nothing."""
    with atomic_output(path, text=True) as f:
        f.write(json_text(payload))


def _is_own_directory(path: Path) -> bool:
    """An empty directory, or one that `gelugemm quantize` wrote: a shard in it carries the
    gelugemm record. Only those are replaced whole by --force."""
    try:
        entries = list(path.iterdir())
        shards = [e for e in entries if e.suffix == ".safetensors" and e.is_file()]
        return not entries or any(RECORD_KEY in (_header_or_none(e) or {}).get("__metadata__", {}) for e in shards)
    except OSError:
        return False


def _header_or_none(path: Path) -> dict | None:
    try:
        return read_header(path)
    except (OSError, HeaderError):
        return None


def is_own_file(path: str | Path) -> bool:
    """A JSON document stamped by `json_document`, or a PNG tagged "Software: gelugemm ..."."""
    path = Path(path)
    try:
        if not path.is_file() or path.stat().st_size > _OWN_FILE_LIMIT:
            return False
        with open(path, "rb") as f:
            head = f.read(8)
            if head == b"\x89PNG\r\n\x1a\n":
                return _png_software(f).startswith(TOOL + " ")
            data = head + f.read()
        document = json.loads(data.decode("utf-8"))
    except (OSError, ValueError, RecursionError):
        return False
    return (
        isinstance(document, dict)
        and document.get("tool") == TOOL
        and isinstance(document.get("schema_version"), int)
    )


def _png_software(f: IO[bytes]) -> str:
    """The value of the PNG's tEXt "Software" chunk (before the image data), or ""."""
    while True:
        head = f.read(8)
        if len(head) < 8:
            return ""
        length, kind = int.from_bytes(head[:4], "big"), head[4:]
        if kind in (b"IDAT", b"IEND") or length > 1 << 20:
            return ""
        body = f.read(length)
        f.read(4)  # CRC
        if kind == b"tEXt":
            key, _, value = body.partition(b"\0")
            if key == b"Software":
                return value.decode("latin-1")
