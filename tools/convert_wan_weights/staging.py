"""Writing into DST safely: one conversion at a time per DST, staging left by a killed conversion swept away, and
each part published by one atomic rename that never replaces what another writer put there meanwhile.

    DST/.dit.partial-1a2b3c4d/dit   a part being written (the part's converter writes a complete folder here)
    DST/dit                         the part, published by one rename once every part has been written

Lock (`locked`): an exclusive `flock` on the DST folder itself, so no lock file is left behind. A second conversion
into the same DST is refused while the first runs; the kernel drops the lock of a killed process, so a DST is never
locked for ever. While it is held, a `.NAME.partial*` beside a part NAME can only be the staging of a conversion that
was killed (a live one would hold the lock): `sweep` removes it and says so. A `.NAME.old-*` (the retired folder of
`uvigu.checkpoint.staged_folder`'s overwrite) is removed when NAME exists, else renamed back: it is then the last
complete NAME. Only our part names are swept; other writers' hidden folders in DST are not touched.

Publish (`publish`): `renameat2(RENAME_NOREPLACE)` moves the staged part into place only if nothing is at the
destination, in one step; a DST/NAME that another process created during the conversion is never replaced or merged
into (an error, its data kept). With overwrite, `RENAME_EXCHANGE` swaps old and new atomically, so there is no moment
without a DST/NAME, and the old one lands in the staging area, which is then removed. Where renameat2 is missing (not
Linux, or a file system without it) the fallback is `os.rename` for folders (it refuses a non-empty folder as its
target) and `os.link` for files (it refuses any existing target).

Test hook: with `UVIGU_CONVERT_TEST_PAUSE_S=<seconds>` in the environment, `before_publish` prints a line and sleeps
that long after every part is staged and before the first is published (tests kill the process there).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Callable, Iterable, Iterator

from tools.convert_wan_weights.conversion import ConversionError
from uvigu import atomic_files

PARTIAL_TAG = ".partial"  # `.{name}.partial-XXXXXXXX` (ours and uvigu.checkpoint's), `.{name}.partial` (older files)
OLD_TAG = ".old-"  # `.{name}.old-XXXXXXXX`: uvigu.checkpoint.staged_folder's retired folder during an overwrite
PAUSE_ENV = "UVIGU_CONVERT_TEST_PAUSE_S"



class DestinationExists(ConversionError):
    """The destination of a part appeared while it was being converted (or exists and overwrite is off)."""


@contextlib.contextmanager
def locked(dst: Path, names: Iterable[str], log: Callable[[str], None] = print) -> Iterator[Path]:
    """Creates DST if needed, holds an exclusive lock on it for the block and sweeps stale staging of `names` first.
    A DST this call created is removed again if it is still empty at the end (a failed first run leaves nothing)."""
    dst = Path(dst).absolute()
    if dst.exists() and not dst.is_dir():
        raise ConversionError(f"{dst}: is a file; DST must be a folder (it gets dit/, vae/, ...)")
    created = not dst.exists()
    try:
        dst.mkdir(parents=True, exist_ok=True)
        fd = os.open(dst, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError as e:
        raise ConversionError(f"{dst}: cannot create or open the DST folder ({e.strerror or e})") from None
    try:
        try:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            have_lock = True
        except BlockingIOError:
            raise ConversionError(f"{dst}: another conversion is writing into this folder right now; wait for it "
                                  "to finish or choose another DST") from None
        except (ImportError, OSError) as e:  # no flock here (e.g. some network file systems): go on, unlocked
            have_lock = False
            log(f"note: could not lock {dst} ({e}); stale staging folders are left alone")
        if have_lock:
            sweep(dst, names, log)
        yield dst
    finally:
        os.close(fd)  # drops the lock
        if created:
            with contextlib.suppress(OSError):
                dst.rmdir()  # only succeeds when empty


def sweep(dst: Path, names: Iterable[str], log: Callable[[str], None] = print) -> list[Path]:
    """Removes the staging of a killed conversion beside each part `name` of DST (see the module docstring); returns
    what was removed or restored. Call it only while holding `locked`."""
    touched = []
    names = tuple(names)
    for entry in sorted(dst.iterdir()):
        for name in names:
            stale_partial = entry.name.startswith(f".{name}{PARTIAL_TAG}")
            stale_old = entry.name.startswith(f".{name}{OLD_TAG}")
            if not (stale_partial or stale_old):
                continue
            final = dst / name
            if stale_old and not os.path.lexists(final):
                entry.rename(final)
                log(f"note: restored {final} from {entry.name}, left by a conversion killed while replacing it")
            else:
                _remove(entry)
                log(f"note: removed {entry}, left by an interrupted conversion")
            touched.append(entry)
            break
    return touched


def new_area(dst: Path, name: str) -> Path:
    """A fresh staging folder `DST/.{name}.partial-XXXXXXXX` for part `name` (write the part to area / name)."""
    area = Path(dst) / f".{name}{PARTIAL_TAG}-{uuid.uuid4().hex[:8]}"
    area.mkdir()
    return area


def discard(area: Path) -> None:
    _remove(area)


def before_publish(names: list[str]) -> None:
    """Called once every part is staged, just before publishing (a hook for tests; see the module docstring)."""
    pause = os.environ.get(PAUSE_ENV)
    if pause:
        print(f"test hook: every part staged ({', '.join(names)}); pausing {pause} s before publishing", flush=True)
        time.sleep(float(pause))


def publish(staged: Path, final: Path, overwrite: bool) -> None:
    """Moves `staged` (a folder or a file) to `final` in one step (`uvigu.atomic_files.publish`): without `overwrite`
    an existing `final` is an error and is left exactly as it is, even one that appeared a moment ago; with it, old
    and new are swapped atomically and the old one ends up at `staged` (the caller removes it)."""
    try:
        atomic_files.publish(staged, final, overwrite)
    except atomic_files.DestinationExists as e:
        raise _exists_error(final) from e


def _exists_error(final: Path) -> DestinationExists:
    return DestinationExists(f"{final} already exists (another process wrote it while this conversion ran?); it was "
                             "left untouched; pass --overwrite to replace it")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


__all__ = ["DestinationExists", "PAUSE_ENV", "before_publish", "discard", "locked", "new_area", "publish", "sweep"]
