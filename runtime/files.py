"""Folders on disk that llamaonnx writes: built atomically, replaced only when that is safe, and
never left half-written (shared/DESIGN.md, "The model folder"). What a model folder holds, its
llamaonnx.json and checksums, is runtime/folder.py's; this module knows folders only by kind.

Writing: `atomic_folder` builds the new folder in a hidden temporary sibling,
`.NAME.tmp-PID-XXXX`, which holds a marker file while it is being written. When the caller's block
ends, the folder is finished (a model folder is sealed: the sha256 of every file goes into its
`llamaonnx.json`) and renamed into place. An existing folder is moved aside first and deleted
only once the new one stands in its place; should the second rename fail, the old one is put
back.

Replacing (`--force`): only a folder that says it is ours (its marker file, e.g. `llamaonnx.json`
with a format version) and holds nothing but the files such a folder has. Never the source, a
folder that contains it or lies inside it, a symbolic link, or a folder of someone's files.

Cleaning up: an exception, Ctrl-C, or SIGTERM/SIGHUP (turned into `Terminated` by
`signals_raise`) removes the temporary folder as the stack unwinds. What SIGKILL or a power cut
leaves behind is found by the next write into the same parent folder: a temporary sibling whose
process is gone is removed, and an old folder moved aside whose replacement never arrived is put
back.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import signal
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from runtime.errors import OutputFolderError, Terminated

log = logging.getLogger(__name__)
PARTIAL_MARKER = ".llamaonnx-partial"  # inside a temporary folder while it is written
_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|scratch|old)-(?P<pid>\d+)-[0-9a-f]+$")


@dataclasses.dataclass(frozen=True)
class FolderKind:
    """A kind of folder llamaonnx writes and may replace: the marker file (JSON with a
    `format_version`, and optionally the `files` it holds) that says a folder is one, the files
    such a folder holds, and what completes a folder of the kind before it is put in place
    (`finish`, e.g. sealing it with checksums). The model folder's kind is
    runtime.folder.MODEL_FOLDER."""

    what: str
    marker: str
    files: frozenset[str]
    finish: Callable[[Path], None] | None = None

    def marker_of(self, folder: Path) -> dict | None:
        """The folder's marker (a dict with an integer `format_version`), or None: not ours."""
        try:
            data = json.loads((folder / self.marker).read_text())
        except (OSError, ValueError):
            return None
        ok = isinstance(data, dict) and isinstance(data.get("format_version"), int)
        return data if ok else None

    def is_marked(self, folder: Path) -> bool:
        return self.marker_of(folder) is not None


# -- checksums -------------------------------------------------------------------------------------
def sha256_file(path: Path, h=None) -> str:
    """The file's sha256; with `h`, a hashlib object, the file is fed to it (several files
    hashed as one) and its digest so far returned."""
    h = hashlib.sha256() if h is None else h
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def digests(folder: Path, skip: Iterable[str] = ()) -> dict[str, dict]:
    """name → {"sha256", "bytes"} for every file of the folder but those in `skip`."""
    skip = {*skip, PARTIAL_MARKER}
    return {
        p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size}
        for p in sorted(Path(folder).iterdir())
        if p.is_file() and p.name not in skip
    }


# -- small atomic writes ---------------------------------------------------------------------------
def write_atomic(path: Path, data: bytes | str) -> None:
    """Writes a file by a temporary sibling and a rename: readers see the old or the new file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        if isinstance(data, str):
            tmp.write_text(data)
        else:
            tmp.write_bytes(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(path: Path, data: dict) -> None:
    write_atomic(path, json.dumps(data, indent=2) + "\n")


# -- replacing -------------------------------------------------------------------------------------
def check_replaceable(
    out_dir: Path, kind: FolderKind, force: bool = False, protected: Iterable[Path] = ()
) -> None:
    """OutputFolderError unless writing `out_dir` (replacing it with `force`) can lose nothing:
    it is not a protected path (the source), does not contain one nor lie inside one, and, if it
    exists, is a folder of `kind` holding only that kind's files."""
    out = Path(out_dir).absolute()
    real = out.resolve()
    for p in protected:
        src = Path(p).absolute().resolve()
        if real == src:
            raise OutputFolderError(f"the output folder {out} is the source itself; choose another")
        if src.is_relative_to(real):
            raise OutputFolderError(
                f"the output folder {out} contains the source {src}; writing it would replace the "
                "source. Choose a folder beside it"
            )
        if real.is_relative_to(src):
            raise OutputFolderError(
                f"the output folder {out} lies inside the source folder {src}; choose a folder "
                "outside it"
            )
    if not out.exists() and not out.is_symlink():
        return
    how = f"--force replaces only {kind.what}"
    if not force:
        raise OutputFolderError(f"the output folder {out} already exists; {how}")
    if out.is_symlink():
        raise OutputFolderError(f"{out} is a symbolic link; {how}, never a link")
    if not out.is_dir():
        raise OutputFolderError(f"{out} is a file, not a folder; {how}")
    marker = kind.marker_of(out)
    if marker is None:
        raise OutputFolderError(
            f"{out} is not {kind.what} (no valid {kind.marker}); {how}, and never deletes other "
            "folders. Choose another output folder"
        )
    listed = marker.get("files")  # the files its manifest lists are its own too
    allowed = set(kind.files) | (set(listed) if isinstance(listed, dict) else set())
    unknown = sorted(p.name for p in out.iterdir() if p.name not in allowed or not p.is_file())
    if unknown:
        more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
        shown = ", ".join(unknown[:5]) + more
        raise OutputFolderError(
            f"{out} holds files that are not part of {kind.what} ({shown}); {how} and never "
            "deletes other files. Move them away or choose another output folder"
        )


def check_writable(out_dir: Path) -> None:
    """OutputFolderError when the output's parent folder cannot be created or written."""
    parent = Path(out_dir).absolute().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputFolderError(f"cannot create the folder {parent}: {e.strerror}") from None
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputFolderError(f"cannot write in {parent}: permission denied")


def check_disk(out_dir: Path, need_bytes: int) -> None:
    check_writable(out_dir)
    parent = Path(out_dir).absolute().parent
    free = shutil.disk_usage(parent).free
    if free < need_bytes:
        raise OutputFolderError(
            f"too little disk space in {parent}: {free / 1e9:.2f} GB free, the model needs about "
            f"{need_bytes / 1e9:.2f} GB"
        )


# -- temporary folders -----------------------------------------------------------------------------
def sibling_name(out_dir: Path, kind: str = "tmp") -> Path:
    """The path of a new hidden folder beside `out_dir` (nothing is created)."""
    out = Path(out_dir).absolute()
    return out.with_name(f".{out.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}")


def make_temporary(tmp: Path) -> None:
    """Creates `tmp`, marked as ours and as in progress. Callers name it first and create it
    inside the `try` that deletes it, so a signal at any moment leaves nothing behind."""
    tmp.mkdir(mode=0o700)
    (tmp / PARTIAL_MARKER).write_text(json.dumps({"pid": os.getpid()}) + "\n")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def clean_stale(parent: Path, kind: FolderKind | None = None) -> list[Path]:
    """Removes what killed runs left in `parent`: temporary folders whose process is gone, and
    old folders of `kind` moved aside (put back where their replacement never arrived). Only
    folders that carry our marker (or `kind`'s) are touched. Returns what it removed or
    restored."""
    done = []
    try:
        entries = list(Path(parent).iterdir())
    except OSError:
        return done
    for entry in entries:
        m = _TEMPORARY.match(entry.name)
        if not m or entry.is_symlink() or not entry.is_dir() or _alive(int(m["pid"])):
            continue
        ours = (entry / PARTIAL_MARKER).is_file() or (kind is not None and kind.is_marked(entry))
        if not ours:
            continue
        target = entry.with_name(m["name"])
        if m["kind"] == "old" and not target.exists() and not target.is_symlink():
            entry.rename(target)
            log.warning("restored %s, which a killed run had moved aside", target)
        else:
            shutil.rmtree(entry, ignore_errors=True)
            log.warning("removed %s, left behind by a killed run (process %s)", entry, m["pid"])
        done.append(entry)
    return done


def _make_readable(folder: Path) -> None:
    """mkdtemp-style folders are private; the output is as readable as any other file."""
    mask = os.umask(0)
    os.umask(mask)
    folder.chmod(0o777 & ~mask)
    for p in folder.iterdir():
        p.chmod(0o666 & ~mask)


def _swap(tmp: Path, out: Path) -> None:
    """Puts `tmp` where `out` is; the old `out` is deleted only once the new one stands."""
    if not out.exists():
        tmp.rename(out)
        return
    old = out.with_name(f".{out.name}.old-{os.getpid()}-{secrets.token_hex(4)}")
    out.rename(old)
    try:
        tmp.rename(out)
    except BaseException:
        old.rename(out)
        raise
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_folder(
    out_dir: Path,
    kind: FolderKind,
    force: bool = False,
    protected: Iterable[Path] = (),
) -> Iterator[Path]:
    """Yields a temporary folder to fill; when the block ends it is finished (a model folder is
    sealed with checksums) and replaces `out_dir`. On any exception, Ctrl-C or `Terminated`, it
    is deleted and `out_dir` is untouched. `protected`: paths the output must never be, contain
    or lie inside."""
    out = Path(out_dir).absolute()
    protected = tuple(protected)
    check_replaceable(out, kind, force, protected)
    check_writable(out)
    clean_stale(out.parent, kind)
    tmp = sibling_name(out)
    try:
        make_temporary(tmp)
        yield tmp
        (tmp / PARTIAL_MARKER).unlink()
        if kind.finish is not None:
            kind.finish(tmp)
        _make_readable(tmp)
        check_replaceable(out, kind, force, protected)  # again: it may have changed meanwhile
        _swap(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def scratch_folder(near: Path) -> Iterator[Path]:
    """A temporary working folder beside `near`, removed however the block ends."""
    check_writable(near)
    clean_stale(Path(near).absolute().parent)
    tmp = sibling_name(near, "scratch")
    try:
        make_temporary(tmp)
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# -- signals ---------------------------------------------------------------------------------------
@dataclasses.dataclass
class StopSignal:
    """The signal that ended the block, if any (see `signals_raise`)."""

    signum: int = 0


@contextlib.contextmanager
def signals_raise() -> Iterator[StopSignal]:
    """Within the block, SIGTERM and SIGHUP raise `Terminated` in the main thread (as SIGINT
    raises KeyboardInterrupt), so every `finally` and `except BaseException` cleanup runs.
    Yields a StopSignal that records the signal: a library that catches the exception and
    raises its own (onnxruntime's import does) still leaves the caller knowing why it ended."""
    stop = StopSignal()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handler(signum, frame):
        stop.signum = signum
        raise Terminated(signum)

    wanted = [getattr(signal, n) for n in ("SIGTERM", "SIGHUP") if hasattr(signal, n)]
    previous = {s: signal.signal(s, handler) for s in wanted}
    try:
        yield stop
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
