"""Atomic writes: every result file appears complete or not at all (temporary name, then rename).

:func:`signals_as_interrupt` turns SIGTERM into an exception while a command runs, so an interrupted write
removes its temporary file instead of leaving it behind (SIGKILL cannot be caught: a ``.NAME.*.tmp*`` file may
then remain; :func:`remove_stale_temps` clears those).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from dataclasses import fields, is_dataclass
from typing import Any
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0o022)  # read by setting; restored at once (the only way to read it)
    os.umask(mask)
    return mask


#: the process's umask, read once at import (reading it means setting it, which is not thread-safe)
_UMASK = _umask()


@contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside ``path``; on success it is fsynced and renamed onto ``path``, with the mode
    a plain ``open(path, "w")`` would give it (``0o666`` less the umask: mkstemp's temporary file is ``0o600``)."""
    path = Path(path)
    if path.is_dir():
        from .errors import InputError

        raise InputError(f"{str(path)!r} is a directory; give the path of a file to write.")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{_owner()}.", suffix=".tmp" + path.suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_with(path, writer: Callable[[Path], None]) -> None:
    """Call ``writer(tmp_path)`` and rename the result onto ``path`` (for h5ad, png, csv writers)."""
    with atomic_path(path) as tmp:
        writer(tmp)


def read_json(path: str | os.PathLike, default=None):
    """The JSON document in ``path``, or ``default`` when it is missing, unreadable or not JSON."""
    import json

    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return default


def temp_files(folder: str | os.PathLike, names: Iterable[str] | None = None, *,
               recursive: bool = False) -> list[Path]:
    """Temporary files of :func:`atomic_path` in ``folder`` (and its subfolders when ``recursive``)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [p for p in (folder.rglob(".*") if recursive else folder.iterdir())
             if p.name.startswith(".") and ".tmp" in p.name and p.is_file()]
    if names is not None:
        names = tuple(names)
        found = [p for p in found if any(p.name.startswith(f".{n}.") for n in names)]
    return sorted(found)


#: temporary files of another machine (shared file system) count as stale after this long
STALE_AFTER_S = 24 * 3600
_OWNER = re.compile(r"\.pk(\d+)@([A-Za-z0-9]*)\.")


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:40]


def _owner() -> str:
    """The writer's mark in a temporary name: process id and host (``pk1234@host``)."""
    return f"pk{os.getpid()}@{_host()}"


def is_stale(tmp: Path) -> bool:
    """True when the process that wrote ``tmp`` is gone: a dead process of this host, or (another host, or no
    mark) a file older than :data:`STALE_AFTER_S`. Another process's write in progress is never stale."""
    m = _OWNER.search(tmp.name)
    if m and m.group(2) == _host():
        pid = int(m.group(1))
        if pid == os.getpid():
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except (PermissionError, OverflowError):
            return False
        return False
    try:
        return time.time() - tmp.stat().st_mtime > STALE_AFTER_S
    except FileNotFoundError:
        return False


def remove_stale_temps(folder: str | os.PathLike, names: Iterable[str] | None = None, *,
                       recursive: bool = False) -> list[Path]:
    """Delete the temporary files of :func:`temp_files` whose writer is gone (:func:`is_stale`); returns them.

    Safe while other processes write into the same folder (``perturbkit bench --jobs``, workflow engines).
    """
    removed = [p for p in temp_files(folder, names, recursive=recursive) if is_stale(p)]
    for p in removed:
        p.unlink(missing_ok=True)
    return removed


def _raise_interrupted(signum, frame):
    from .errors import Interrupted

    raise Interrupted(signum)


@contextmanager
def signals_as_interrupt(signums=(signal.SIGTERM,)):
    """While inside, the given signals raise :class:`~perturbkit.errors.Interrupted` (a KeyboardInterrupt).

    So ``kill PID`` unwinds like Ctrl-C: :func:`atomic_path` deletes its temporary file and nothing
    half-written is left. The previous handlers are restored on exit. Outside the main thread (where Python
    cannot install handlers) this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {}
    for s in signums:
        previous[s] = signal.signal(s, _raise_interrupted)
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def read_toml(path: str | os.PathLike) -> dict:
    """A TOML config file as a dict; a missing, unreadable or invalid file raises :class:`InputError`."""
    import tomllib

    from .errors import InputError

    path = Path(path)
    if not path.is_file():
        raise InputError(f"config {str(path)!r} does not exist or is not a file.")
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise InputError(f"config {str(path)!r} is not valid TOML: {exc}.") from None
    except UnicodeDecodeError:
        raise InputError(f"config {str(path)!r} is not a UTF-8 text file.") from None


# ============================================================================ output guard and writers


def check_out(out: str | os.PathLike, *, accepts: Callable[[Path, list[str]], bool], force: bool | None = None,
              what: str = "another run or tool") -> None:
    """The one output-directory guard: ``out`` must be new, empty, or a directory that ``accepts(out, entries)``
    (a previous run of the same configuration; ``entries``: its visible file names). ``force=True`` takes any
    directory; callers that offer no force leave it None (the message then does not offer it). A file, or a
    directory of anything else, raises :class:`InputError` naming the fix."""
    from .errors import InputError

    out = Path(out)
    if not out.exists():
        return
    if not out.is_dir():
        raise InputError(f"out {str(out)!r} exists and is a file; give a directory.", params=("out",))
    entries = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    if not entries or force or accepts(out, entries):
        return
    fix = "Choose a new or empty directory" + (", or overwrite them with force." if force is not None else ".")
    raise InputError(f"out {str(out)!r} already holds other files ({', '.join(entries[:4])}) from {what}. {fix}",
                     params=("out", "force") if force is not None else ("out",))


def json_default(o):
    """``json.dumps(default=...)`` for records: numpy scalars and arrays, paths."""
    import numpy as np

    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def to_json(obj, indent: int = 2) -> str:
    return json.dumps(obj, indent=indent, default=json_default) + "\n"


def write_csv(path: str | Path, table, *, float_format: str | None = "%.10g") -> None:
    """A table as CSV, atomically, in the one format every perturbkit table uses."""
    atomic_write_text(path, table.to_csv(index=False, float_format=float_format, lineterminator="\n"))


def write_png(path: str | Path, fig, dpi: int = 110) -> None:
    """A figure as PNG, atomically, without the software tag (so reruns give identical bytes)."""
    atomic_write_with(path, lambda p: fig.savefig(p, dpi=dpi, format="png", metadata={"Software": None}))


def plain(obj):
    """A config dataclass as JSON-ready data (``config.plain``) (tuples as lists, flattened fields merged into their table)."""
    if is_dataclass(obj) and not isinstance(obj, type):
        if hasattr(obj, "to_plain"):
            return obj.to_plain()
        out: dict[str, Any] = {}
        for f in fields(obj):
            value = plain(getattr(obj, f.name))
            if f.name in getattr(type(obj), "FLATTEN", ()):  # merged into their table
                out.update(value)
            else:
                out[f.name] = value
        return out
    if isinstance(obj, tuple | list):
        return [plain(v) for v in obj]
    if isinstance(obj, dict):
        return {k: plain(v) for k, v in obj.items()}
    return obj


def stamp(t: float | None = None) -> str:
    """A local ISO-8601 timestamp with offset (``time.time()`` when ``t`` is None)."""
    return time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(time.time() if t is None else t))
