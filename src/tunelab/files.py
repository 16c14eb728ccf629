"""Files the user names or tunelab writes: read with an error that names the file and the problem, or made beside
their final place and renamed into it, with a failed write (a full disk) told in words."""

from __future__ import annotations

import errno
import hashlib
import glob
import json
import os
import re
import shutil
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tunelab.errors import TunelabError


def read_user_text(path, what: str, error: type[TunelabError] = TunelabError, encoding: str = "utf-8") -> str:
    """The text of a file the user named (`what`: the setting or option that named it), or `error` saying what is
    wrong with it: not there, not UTF-8 (with the line), not readable."""
    path = Path(path).expanduser()
    try:
        return path.read_text(encoding=encoding)
    except FileNotFoundError:
        raise error(f"{what}: no file {path}") from None
    except UnicodeDecodeError as e:
        line = path.read_bytes()[:e.start].count(b"\n") + 1
        raise error(f"{what}: {path} is not UTF-8 text (line {line}, byte {e.start}); save it as UTF-8") from None
    except OSError as e:
        raise error(f"{what}: cannot read {path}: {e.strerror or e}") from None


def sha256_file(path: Path | str) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB pieces (larger ones hash no faster and show in prepare's memory
    peak; sha256, not blake2b: ~1.7x faster on CPUs with SHA extensions)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(2**20):
            h.update(chunk)
    return h.hexdigest()


def read_json_object(path, error: type[TunelabError] = TunelabError) -> dict:
    """A JSON file that must hold an object (a manifest, a checkpoint's record), or `error` naming the file."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise error(f"cannot read {path}: {e}") from None
    if not isinstance(data, dict):
        raise error(f"cannot read {path}: a JSON object was expected, found {type(data).__name__}")
    return data


def write_failure(e: BaseException, folder) -> str:
    """Why writing into `folder` failed, in words: "the disk is full: N MiB free in <folder>" when it is, else the
    error itself. Call it before what was partly written is removed: safetensors, torch ("PytorchStreamWriter
    failed writing file") and gguf ("N requested and M written") report a full disk in their own exceptions,
    mostly without an errno, so the free space left at that moment is what tells it."""
    code, said = (e.errno if isinstance(e, OSError) else None), str(e)
    if code == errno.EDQUOT or os.strerror(errno.EDQUOT) in said:
        return f"your disk quota is used up in {folder}"
    try:
        usage = shutil.disk_usage(folder)
        free = usage.free if usage.total else None  # /proc, /sys: no size, so "0 free" tells nothing
    except OSError:
        free = None
    guess = code is None and free is not None and free < _FULL_BELOW  # EACCES, EROFS, ...: the error says why
    if code == errno.ENOSPC or os.strerror(errno.ENOSPC) in said or guess:
        return "the disk is full" + (f": {free / 2**20:,.0f} MiB free in {folder}" if free is not None else "")
    return f"{type(e).__name__}: {e}"


_FULL_BELOW = 64 * 2**20  # a failed write that leaves less than this free was the disk filling up


def retry_advice(why: str, again: str) -> str:
    """What to do after a write failed for `why` (`write_failure`'s words) before doing `again` ("merge again")."""
    return f"{'free some space' if why.startswith(('the disk is full', 'your disk quota')) else 'fix that'} and {again}"


@contextmanager
def writing(what: str, folder, error: type[TunelabError], then: str, again: str | None = None) -> Iterator[None]:
    """Writing `what` (e.g. "the merged model models/m") into `folder`: any failure of the write becomes `error`
    naming it, `write_failure`'s reason, `then` (what was left: the caller removes the partial files, after this
    has judged the free space they hold) and, with `again`, what to do (`retry_advice`)."""
    try:
        yield
    except (TunelabError, MemoryError):
        raise
    except Exception as e:
        why = write_failure(e, folder)
        raise error(f"could not write {what}: {why}. {then}" + (f"; {retry_advice(why, again)}" if again else "")
                    ) from None


def staging_dir(final: Path) -> Path:
    """A new empty folder beside `final`, to be renamed into place once complete, with the permissions `mkdir` gives
    (tempfile.mkdtemp's are 0700: a merged model or a prepared dataset only its owner could read). What a killed
    process left of `final` is dealt with first (`remove_orphans`)."""
    import tempfile

    remove_orphans(final)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-{_HOST}-{os.getpid()}-", dir=final.parent))
    tmp.chmod(0o777 & ~_umask())
    return tmp


def staging_file(final: Path) -> Path:
    """The name of a file beside `final` to write and then rename into place (a GGUF, its Modelfile); what a killed
    process left of `final` is removed first (`remove_orphans`), as for `staging_dir`."""
    remove_orphans(final)
    return final.with_name(f".{final.name}.tmp-{_HOST}-{os.getpid()}")


def swap_into_place(tmp: Path, final: Path) -> None:
    """Rename the complete folder `tmp` to `final`, replacing the folder there: the old one is renamed aside first
    and removed after, so `final` is never a mix of both. Interrupted between the two renames, the old one is put
    back; killed there, the next `remove_orphans(final)` puts it back."""
    old = final.with_name(f".{final.name}.old-{_HOST}-{os.getpid()}")
    if final.exists():
        os.replace(final, old)
    try:
        os.replace(tmp, final)
    except BaseException:
        if old.exists() and not final.exists():
            os.replace(old, final)
        raise
    shutil.rmtree(old, ignore_errors=True)


def remove_orphans(final: Path) -> None:
    """Undo what a process killed outright (no cleanup ran) while writing `final` left beside it: its staging folders
    and files are removed; the old `final` it had renamed aside to swap in the new one is put back if `final` is missing (the
    kill came between the renames), else removed (it came during the removal)."""
    from tunelab.rundir import pid_alive

    # this machine's only: on shared storage another machine's folders are not ours to judge
    own = re.compile(rf"\.{re.escape(final.name)}\.(tmp|old)-{re.escape(_HOST)}-(\d+)(-|$)")
    leftovers = [p for kind in ("tmp", "old") for p in final.parent.glob(f".{glob.escape(final.name)}.{kind}-*")]
    for left in leftovers:
        m = own.match(left.name)
        if not (m and pid_alive(int(m.group(2))) is False):
            continue
        if m.group(1) == "old" and left.is_dir() and not final.exists():
            os.replace(left, final)
        elif left.is_dir():
            shutil.rmtree(left, ignore_errors=True)
        else:  # a staging file (staging_file)
            left.unlink(missing_ok=True)


def as_umask_allows(path: Path) -> None:
    """`path` (a file, or a folder and everything in it) with the permissions a plain `open` would give under this
    umask: safetensors writes its files 0600, so merged weights and adapters only their owner could read."""
    mask = _umask()
    for p in [path, *path.rglob("*")] if path.is_dir() else [path]:
        p.chmod((0o777 if p.is_dir() else 0o666) & ~mask)


_HOST = re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname()) or "host"


def _umask() -> int:
    """This process's umask, read without setting it (os.umask would change it for every thread meanwhile)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            return next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
        return 0o022
