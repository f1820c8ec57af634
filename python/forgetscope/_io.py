"""Atomic output: write to a temporary file in the destination directory, fsync, rename.

Every file forgetscope writes goes through :func:`atomic_write` or :func:`atomic_path`, so a reader
never sees a half-written file and a run killed at any moment (even by SIGKILL) leaves each output
either absent or as its previous complete version.

Temporary files are hidden siblings named ``.<name>.tmp-<pid>-<random>``. A killed run cannot remove
its own; the next write of the same output deletes any whose writing process is gone, and
:func:`stale_temporaries` lists them. Nothing else in a directory is ever touched.

The rename is the commit point: the data and the file are fsynced before it and the directory after
it, so the new version survives a power cut once the writer has returned.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
from pathlib import Path
from typing import IO, Iterator, List, Union

PathLike = Union[str, "os.PathLike[str]"]

_TMP = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<pid>\d+)-[0-9a-f]{8}$")


def _umask() -> int:
    """The process umask, read without changing it where /proc allows (os.umask is racy in threads)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid() or os.name != "posix":
        return True  # on Windows os.kill(pid, 0) would send CTRL_C_EVENT: never probe, never clean
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists, but belongs to someone else
    return True


def stale_temporaries(directory: PathLike) -> List[Path]:
    """Temporary files in ``directory`` left by writers that no longer run (e.g. a killed run)."""
    out = []
    with contextlib.suppress(OSError):
        for entry in os.scandir(directory):
            m = _TMP.match(entry.name)
            if m and not _pid_alive(int(m.group("pid"))):
                out.append(Path(entry.path))
    return sorted(out)


def _clean_stale(dest: Path) -> None:
    """Remove temporaries of ``dest`` whose writer died before renaming them."""
    with contextlib.suppress(OSError):
        for entry in os.scandir(dest.parent):
            m = _TMP.match(entry.name)
            if m and m.group("name") == dest.name and not _pid_alive(int(m.group("pid"))):
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)


def _create_temp(dest: Path) -> "tuple[int, str]":
    dest.parent.mkdir(parents=True, exist_ok=True)
    _clean_stale(dest)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    for _ in range(100):
        tmp = dest.parent / f".{dest.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            # The final file gets the permissions a plain open() would give it (0666 & ~umask), or the
            # previous version's; mkstemp's 0600 would silently make shared outputs unreadable.
            fd = os.open(tmp, flags, 0o600)
        except FileExistsError:
            continue
        try:
            mode = dest.stat().st_mode & 0o7777 if dest.exists() else 0o666 & ~_umask()
            if hasattr(os, "fchmod"):
                os.fchmod(fd, mode)
            else:  # pragma: no cover - Windows
                os.chmod(tmp, mode)
        except OSError:
            pass
        return fd, str(tmp)
    raise FileExistsError(f"{dest}: could not create a temporary file beside it")


def _fsync_dir(directory: Path) -> None:
    """Make the rename durable (POSIX); a no-op where directories cannot be opened."""
    if os.name != "posix":
        return
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


def _commit(tmp: str, dest: Path) -> None:
    """The commit point: rename the complete temporary over ``dest``.

    A separate function so the kill test (tests/test_check.py) can slow it down from a wrapper
    script and SIGKILL a run between "temporary complete" and "renamed"; production never patches it.
    """
    os.replace(tmp, dest)
    _fsync_dir(dest.parent)


@contextlib.contextmanager
def atomic_write(path: PathLike, mode: str = "w", encoding: str = "utf-8") -> Iterator[IO]:
    """Open a temporary sibling of ``path`` for writing; rename it over ``path`` on success.

    On an exception inside the block the temporary is removed and ``path`` is left as it was.
    """
    dest = Path(path)
    fd, tmp = _create_temp(dest)
    try:
        if "b" in mode:
            f = os.fdopen(fd, mode)
        else:
            f = os.fdopen(fd, mode, encoding=encoding, newline="")
        with f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        _commit(tmp, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_path(path: PathLike) -> "contextlib.AbstractContextManager[Path]":
    """Yield a temporary path next to ``path`` for writers that want a file name (e.g. parquet).

    The writer may replace the file at that path; it is fsynced and renamed over ``path`` when the
    block ends without an exception.
    """

    @contextlib.contextmanager
    def _cm() -> Iterator[Path]:
        dest = Path(path)
        fd, tmp = _create_temp(dest)
        os.close(fd)
        try:
            yield Path(tmp)
            fd2 = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd2)
            finally:
                os.close(fd2)
            _commit(tmp, dest)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

    return _cm()


def atomic_write_text(path: PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_write(path) as f:
        f.write(text)


def append_once(path: PathLike, text: str) -> None:
    """Append ``text`` to a file someone else owns (e.g. ``$GITHUB_STEP_SUMMARY``) in one write(2).

    Replacing a file we do not own by rename is not ours to do; with O_APPEND and a single write
    a killed run adds either nothing or the whole block.
    """
    data = text.encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
    try:
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]
    finally:
        os.close(fd)
