"""How gammamod writes directories and runs child processes, so that no user file is ever lost.

Output directories (artifacts, checkpoints made by make-tiny, bundles) are written by
:class:`OutputDir`:

* the new directory is built in a private ``.OUT.partial-<pid>-<token>`` beside ``OUT`` and
  appears whole, by one rename, or not at all;
* ``--force`` replaces only a directory that gammamod itself wrote (the caller says how to
  recognise it), never a regular file, a symbolic link, the input being read or a directory
  holding it, the working directory or one of its parents; the swap is atomic (the new directory
  is complete before the old one goes: Linux's ``renameat2(RENAME_EXCHANGE)``);
* writers of one ``OUT`` exclude each other with a lock (``.OUT.lock``, ``flock``: released by the
  kernel even when the holder is killed), so a second writer is told ``OUT`` is being written,
  and partial directories left by a killed writer are removed by the next one.

Child processes that must not outlive the CLI call :func:`die_with_parent` first thing.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import secrets
import shutil
import signal
import sys
from pathlib import Path

from gammamod.errors import GammamodError

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
_PR_SET_PDEATHSIG = 1


def _libc():
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """Have the kernel send ``sig`` to this process when its parent dies (Linux), and leave
    Ctrl-C to the parent: it stops its children itself, with one line and no traceback."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    libc = _libc()
    if libc is None or not hasattr(libc, "prctl") or not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    libc.prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2). False where the system cannot."""
    libc = _libc()
    fn = getattr(libc, "renameat2", None) if libc is not None else None
    if fn is None:
        return False
    res = fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if res == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EPERM):  # filesystem or kernel without exchange
        return False
    raise OSError(err, os.strerror(err), str(b))


def _a(noun: str) -> str:
    return f"{'an' if noun[:1] in 'aeiou' else 'a'} {noun}"


def _inside(path: Path, ancestor: Path) -> bool:
    return path == ancestor or ancestor in path.parents


def check_replaceable(out: Path, force: bool, inputs=(), is_ours=None, what: str = "output directory") -> bool:
    """Refuse, in one line, to write ``out`` where that could destroy something that is not ours.
    Returns whether ``out`` exists (and may be replaced)."""
    if out.is_symlink():
        raise GammamodError(f"{out}: is a symbolic link; give the {what} a path of its own")
    if out.exists() and not out.is_dir():
        raise GammamodError(f"{out}: exists and is not a directory (expected a path for the {what})")
    real = Path(os.path.realpath(out))
    for source in inputs:
        if source is None:
            continue
        src = Path(os.path.realpath(source))
        if _inside(src, real):
            raise GammamodError(f"{out}: {'is' if src == real else 'contains'} the input {source}; "
                                f"write the {what} somewhere else")
    cwd = Path(os.getcwd()).resolve()
    if _inside(cwd, real):
        raise GammamodError(f"{out}: is the working directory or one of its parents; give the {what} its own path")
    if not out.exists():
        return False
    if not force:
        raise GammamodError(f"{out}: already exists (pass --force to replace it)")
    if is_ours is None or not is_ours(out):
        raise GammamodError(f"{out}: exists and is not {_a(what)} that gammamod wrote; --force replaces only those "
                            "(remove it yourself if you mean to)")
    return True


def check_file_replaceable(out: Path, force: bool = False, is_ours=None, what: str = "output file") -> None:
    """Refuse, in one line, to write the file ``out`` over a directory, a link, or an existing file
    without ``force`` or that ``is_ours(out)`` does not claim as gammamod's."""
    out = Path(out)
    if out.is_symlink():
        raise GammamodError(f"{out}: is a symbolic link; give the {what} a path of its own")
    if out.is_dir():
        raise GammamodError(f"{out}: is a directory (expected a path for the {what})")
    if not out.parent.is_dir():
        raise GammamodError(f"{out}: its directory {out.parent} does not exist")
    if out.exists():
        if not force:
            raise GammamodError(f"{out}: already exists (pass --force to replace it)")
        if is_ours is None or not is_ours(out):
            raise GammamodError(f"{out}: exists and is not {_a(what)} that gammamod wrote; --force replaces only "
                                "those (remove it yourself if you mean to)")


def write_file(out: Path, data: bytes, force: bool = False, is_ours=None, what: str = "output file") -> Path:
    """Write one output file whole or not at all (:func:`check_file_replaceable` first): a hidden
    temporary file beside it, renamed over ``out``."""
    out = Path(out)
    check_file_replaceable(out, force, is_ours, what)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    return out


class OutputDir:
    """``with OutputDir(out, ...) as partial:`` write into ``partial``; leaving the block without
    an exception puts it in place of ``out``. Any exception (Ctrl-C included) removes ``partial``
    and leaves ``out`` as it was."""

    def __init__(self, out, force: bool = False, inputs=(), is_ours=None, what: str = "output directory"):
        self.out = Path(out)
        self.force = force
        self.inputs = list(inputs)
        self.is_ours = is_ours
        self.what = what
        self.partial: Path | None = None
        self._lock_fd: int | None = None

    # -- the lock ------------------------------------------------------------------------------
    @property
    def _lock_path(self) -> Path:
        return self.out.parent / f".{self.out.name}.lock"

    def _acquire(self) -> None:
        while True:
            fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise GammamodError(f"{self.out}: is being written by another gammamod process right now; "
                                    "wait for it to finish or choose another path") from None
            try:  # the holder before us may have removed the lock file: lock the one on disk
                if os.stat(self._lock_path).st_ino == os.fstat(fd).st_ino:
                    self._lock_fd = fd
                    return
            except FileNotFoundError:
                pass
            os.close(fd)

    def _release(self) -> None:
        if self._lock_fd is None:
            return
        with contextlib.suppress(OSError):
            os.unlink(self._lock_path)
        os.close(self._lock_fd)
        self._lock_fd = None

    def _remove_stale(self) -> None:
        """Partial directories of ``out`` whose writer is gone (we hold the lock: all of them)."""
        for p in self.out.parent.glob(f".{self.out.name}.partial*"):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)

    # -- the context ---------------------------------------------------------------------------
    def __enter__(self) -> Path:
        check_replaceable(self.out, self.force, self.inputs, self.is_ours, self.what)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self._acquire()
        try:
            self._remove_stale()
            # checked again under the lock: another writer may have finished meanwhile
            check_replaceable(self.out, self.force, self.inputs, self.is_ours, self.what)
            self.partial = self.out.parent / f".{self.out.name}.partial-{os.getpid()}-{secrets.token_hex(4)}"
            self.partial.mkdir()
        except BaseException:
            self._release()
            raise
        return self.partial

    def __exit__(self, exc_type, exc, tb) -> bool:
        try:
            if exc_type is None:
                self._commit()
        except BaseException:
            exc_type = True
            raise
        finally:
            if exc_type is not None and self.partial is not None:
                shutil.rmtree(self.partial, ignore_errors=True)
            self._release()
        return False

    def _commit(self) -> None:
        partial, out = self.partial, self.out
        if not out.exists():
            partial.rename(out)
            return
        # the old directory is still ours: check_replaceable ran under the lock
        if _exchange(partial, out):
            shutil.rmtree(partial, ignore_errors=True)  # now holds the old directory
            return
        old = out.parent / f".{out.name}.partial-old-{secrets.token_hex(4)}"
        out.rename(old)
        partial.rename(out)
        shutil.rmtree(old, ignore_errors=True)


def is_artifact(path: Path) -> bool:
    """A directory holding gammamod's artifact manifest (any schema version)."""
    import json

    from gammamod.manifest import MANIFEST, SCHEMA

    try:
        data = json.loads((Path(path) / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and data.get("schema") == SCHEMA
