"""Files the user names or tunelab writes: read with an error that names the file and the problem, or made beside
their final place and renamed into it."""

from __future__ import annotations

import glob
import json
import os
import re
import socket
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


def read_json_object(path, error: type[TunelabError] = TunelabError) -> dict:
    """A JSON file that must hold an object (a manifest, a checkpoint's record), or `error` naming the file."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise error(f"cannot read {path}: {e}") from None
    if not isinstance(data, dict):
        raise error(f"cannot read {path}: a JSON object was expected, found {type(data).__name__}")
    return data


def staging_dir(final: Path) -> Path:
    """A new empty folder beside `final`, to be renamed into place once complete, with the permissions `mkdir` gives
    (tempfile.mkdtemp's are 0700: a merged model or a prepared dataset only its owner could read). Staging folders
    of `final` whose process is gone (killed outright: no cleanup ran) are removed first."""
    import tempfile

    _remove_orphans(final)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-{_HOST}-{os.getpid()}-", dir=final.parent))
    tmp.chmod(0o777 & ~_umask())
    return tmp


def _remove_orphans(final: Path) -> None:
    import shutil

    from tunelab.rundir import pid_alive

    # this machine's only: on shared storage another machine's staging folder is not ours to judge
    own = re.compile(rf"\.{re.escape(final.name)}\.tmp-{re.escape(_HOST)}-(\d+)-")
    for folder in final.parent.glob(f".{glob.escape(final.name)}.tmp-*"):
        m = own.match(folder.name)
        if m and folder.is_dir() and pid_alive(int(m.group(1))) is False:
            shutil.rmtree(folder, ignore_errors=True)


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
