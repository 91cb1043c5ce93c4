"""Writing output files so that nothing is lost (importable without torch).

- `atomic_path` / `write_text` / `write_bytes`: every output goes to a temporary file in the
  target's directory, is flushed and fsynced, then renamed over the target. On any failure the
  temporary file is removed and the old target is left exactly as it was.
- `check_output`: the checks an output path can pass before any work (directory exists and is
  writable, the path is not a directory, the suffix names a format this command writes).
- `OutputLock`: a `<output>.lock` file holding the writer's pid, so two runs never write one
  output; the lock of a process that no longer runs is stale and taken over.
- `json_safe`: JSON without NaN/inf (they are not JSON): written as null, and the caller is
  told which fields were.

OS and library failures become `OutputError`, one line naming the path and the cause.
"""

from __future__ import annotations

import math
import os
import tempfile
from contextlib import contextmanager
from glob import escape as glob_escape
from pathlib import Path
from typing import Iterator

from circuits.errors import CircuitsError


class OutputError(CircuitsError):
    """An output that cannot be written (or must not be): the message names the path and why."""


def cause(err: BaseException) -> str:
    """The reason of an OS or library failure in a few words ('No space left on device')."""
    if isinstance(err, OSError) and err.errno is not None:
        return os.strerror(err.errno)
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_dir(directory: Path) -> None:
    """Make the rename durable; not every file system lets a directory be opened (then skip)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class _Watched:
    """A file whose write errors are remembered: writers such as torch.save replace the OS error
    by their own message ('unexpected pos …'); the remembered one says what happened."""

    def __init__(self, f):
        self._f, self.error = f, None

    def write(self, data):
        try:
            return self._f.write(data)
        except OSError as err:
            self.error = self.error or err
            raise

    def __getattr__(self, name):
        return getattr(self._f, name)


def _remove_stale_temporaries(path: Path) -> None:
    """Temporaries of `path` left by a process that was killed mid-write (SIGKILL runs no cleanup):
    their names carry the writer's pid, so those of dead processes can go."""
    prefix = f".{path.name}."
    directory = path.parent if str(path.parent) else Path(".")
    try:
        candidates = list(directory.glob(f"{glob_escape(prefix)}*.tmp"))
    except OSError:
        return
    for tmp in candidates:
        pid = tmp.name[len(prefix):].split(".", 1)[0]
        if pid.isdigit() and not _pid_alive(int(pid)):
            try:
                tmp.unlink()
            except OSError:
                pass


@contextmanager
def atomic_path(path: str | Path, _watched: list | None = None) -> Iterator[Path]:
    """Yield a temporary path next to `path` for a writer that takes a path (torch.save, a
    renderer); on success it replaces `path` durably, on any failure it is removed and `path` is
    untouched. OS errors and the writer's own failures (RuntimeError) become OutputError."""
    path = Path(path)
    _remove_stale_temporaries(path)
    try:
        fd, name = tempfile.mkstemp(dir=path.parent if str(path.parent) else ".",
                                    prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp")
    except OSError as err:
        raise OutputError(f"cannot write {path}: {cause(err)}") from None
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        mode = (path.stat().st_mode & 0o777) if path.exists() else (0o666 & ~_umask())
        os.chmod(tmp, mode)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        _fsync_dir(tmp.parent)
    except BaseException as err:
        try:
            tmp.unlink()
        except OSError:
            pass
        if isinstance(err, (OSError, RuntimeError)) and not isinstance(err, CircuitsError):
            first = next((w.error for w in _watched or [] if w.error is not None), None)
            raise OutputError(f"cannot write {path}: {cause(first or err)}") from None
        raise


@contextmanager
def atomic_open(path: str | Path, mode: str = "w") -> Iterator:
    """An open file (mode 'w' or 'wb') whose content replaces `path` only once fully written."""
    watched: list[_Watched] = []
    with atomic_path(path, watched) as tmp:
        with open(tmp, mode, **({"encoding": "utf-8"} if "b" not in mode else {})) as f:
            watched.append(_Watched(f))
            yield watched[0]
            f.flush()


def write_text(path: str | Path, text: str) -> None:
    with atomic_open(path, "w") as f:
        f.write(text)


def write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_open(path, "wb") as f:
        f.write(data)


# ---- checks before any work --------------------------------------------------------------------

def check_output(path: str | Path, suffixes: tuple[str, ...] | None = None, what: str = "output") -> None:
    """Refuse an output path that could not be written, before any work is done."""
    p = Path(path)
    if p.is_dir():
        raise OutputError(f"{what} {p} is a directory; give a file path")
    if suffixes and p.suffix.lower() not in suffixes:
        shown = p.suffix or "no suffix"
        raise OutputError(f"{what} {p}: {shown} is not a format this command writes; use "
                          f"{' or '.join(suffixes)}")
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise OutputError(f"{what} {p}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        why = "read-only file system" if _read_only_fs(parent) else "no write permission"
        raise OutputError(f"{what} {p}: directory {parent} is not writable ({why})")


def _read_only_fs(directory: Path) -> bool:
    try:
        return bool(os.statvfs(directory).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):
        return False


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:        # exists, owned by someone else
        return True
    return True


class OutputLock:
    """`<path>.lock` holding this process's pid for as long as the output is being made.

    Another live process's lock is refused (naming it); a lock whose pid no longer runs is stale
    (a killed run) and is taken over. Removed on exit."""

    def __init__(self, paths: list[str | Path]):
        self.locks = [Path(str(p) + ".lock") for p in dict.fromkeys(str(p) for p in paths)]
        self.held: list[Path] = []

    def __enter__(self) -> "OutputLock":
        try:
            for lock in self.locks:
                self._take(lock)
                self.held.append(lock)
        except BaseException:
            self.release()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def release(self) -> None:
        for lock in self.held:
            try:
                lock.unlink()
            except OSError:
                pass
        self.held = []

    @staticmethod
    def _take(lock: Path) -> None:
        output = str(lock)[: -len(".lock")]
        for _ in range(3):
            try:
                fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    pid = int(lock.read_text().strip() or 0)
                except (OSError, ValueError):
                    pid = 0
                if pid != os.getpid() and _pid_alive(pid):
                    raise OutputError(f"{output} is being written by another run (pid {pid}; lock file "
                                      f"{lock}): wait for it, or choose another output path") from None
                try:
                    lock.unlink()       # stale: its process is gone
                except FileNotFoundError:
                    pass
                continue
            except OSError as err:
                raise OutputError(f"cannot create the lock file {lock}: {cause(err)}") from None
            with os.fdopen(fd, "w") as f:
                f.write(str(os.getpid()))
            return
        raise OutputError(f"could not take the lock file {lock}: another run keeps creating it")


# ---- reading -------------------------------------------------------------------------------------

def row_count(path: Path) -> int | None:
    """Rows of a JSONL or CSV file, counted from its line breaks (fast: no parsing); None for a
    JSON array."""
    lines = blank = 0
    last = b"\n"
    with path.open("rb") as f:
        head = f.read(1 << 16)
        if head.lstrip().startswith(b"["):
            return None
        block = head
        while block:
            lines += block.count(b"\n")
            blank += block.count(b"\n\n")
            last = block[-1:]
            block = f.read(1 << 20)
    lines += last != b"\n"
    return max(lines - blank - (path.suffix.lower() == ".csv"), 0)


# ---- JSON without NaN -----------------------------------------------------------------------------

def json_safe(obj, where: str = "", replaced: list[str] | None = None):
    """A copy of obj with every non-finite float replaced by None; the JSON paths replaced are
    appended to `replaced`."""
    if isinstance(obj, float) and not math.isfinite(obj):
        if replaced is not None:
            replaced.append(where or "value")
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v, f"{where}.{k}" if where else str(k), replaced) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v, f"{where}[{i}]", replaced) for i, v in enumerate(obj)]
    return obj

