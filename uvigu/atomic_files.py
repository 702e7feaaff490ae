"""Publishing files and folders in one step, so that a reader never sees half of one and a writer never replaces
what another process put there meanwhile.

`publish(staged, final, overwrite)` moves a finished staging folder or file into place with Linux's renameat2:
RENAME_NOREPLACE without `overwrite` (an existing `final`, even one that appeared a moment ago, is an error and is left
untouched), RENAME_EXCHANGE with it (old and new swapped atomically; the old one ends up at `staged`). Where renameat2
is unavailable, a plain rename refuses a non-empty folder and a hard link refuses an existing file.
`write_text(path, text)` writes a temporary sibling and renames it over `path`.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import sys
from pathlib import Path

_AT_FDCWD = -100
_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2


class DestinationExists(FileExistsError):
    """`final` exists (perhaps written by another process meanwhile) and was left untouched."""


def publish(staged: Path, final: Path, overwrite: bool) -> None:
    """Moves `staged` (a folder or a file) to `final` in one step (see the module docstring). With `overwrite`, the
    replaced `final` is left at `staged` for the caller to remove (or, on the fallback path, at `staged.retired`)."""
    staged, final = Path(staged), Path(final)
    if not overwrite:
        if not _renameat2(staged, final, _RENAME_NOREPLACE):
            _fallback_noreplace(staged, final)
        return
    if not os.path.lexists(final):
        try:
            publish(staged, final, overwrite=False)
            return
        except DestinationExists:
            pass  # appeared just now: overwrite was asked for, so swap
    if _renameat2(staged, final, _RENAME_EXCHANGE):
        return
    os.rename(final, staged.parent / f"{staged.name}.retired")
    os.rename(staged, final)


def write_text(path: Path, text: str) -> None:
    """`path` holds `text` or what it held before, never a part of `text`."""
    path = Path(path)
    tmp = path.parent / f".{path.name}.partial-{os.getpid()}"
    try:
        tmp.write_text(text)
        tmp.replace(path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _exists(final: Path) -> DestinationExists:
    return DestinationExists(f"{final} already exists (another process wrote it meanwhile?); it was left untouched")


_libc_renameat2 = None


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """True when renameat2 did it; False when it is unavailable here (use the fallback); raises otherwise."""
    global _libc_renameat2
    if not sys.platform.startswith("linux"):
        return False
    if _libc_renameat2 is None:
        try:
            fn = ctypes.CDLL(None, use_errno=True).renameat2
        except (AttributeError, OSError):
            _libc_renameat2 = False
            return False
        fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        fn.restype = ctypes.c_int
        _libc_renameat2 = fn
    if _libc_renameat2 is False:
        return False
    if _libc_renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL):  # kernel or file system without the flag
        return False
    if err in (errno.EEXIST, errno.ENOTEMPTY):
        raise _exists(dst)
    raise OSError(err, f"cannot move {src} to {dst}: {os.strerror(err)}")


def _fallback_noreplace(staged: Path, final: Path) -> None:
    if os.path.lexists(final):
        raise _exists(final)
    try:
        if staged.is_dir():
            os.rename(staged, final)  # refuses a non-empty folder that appeared since the check
        else:
            os.link(staged, final)  # refuses any file that appeared since the check
            staged.unlink()
    except (FileExistsError, IsADirectoryError, NotADirectoryError) as e:
        raise _exists(final) from e
    except OSError as e:
        if e.errno == errno.ENOTEMPTY:
            raise _exists(final) from None
        raise
