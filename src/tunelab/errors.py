"""The exception every user-facing tunelab failure derives from: the CLI prints its message, no traceback."""


class TunelabError(Exception):
    """A failure whose message already tells the user what went wrong and what to do."""

    exit_code = 2


def read_user_text(path, what: str, error: type[TunelabError] = TunelabError, encoding: str = "utf-8") -> str:
    """The text of a file the user named (`what`: the setting or option that named it), or `error` saying what is
    wrong with it: not there, not UTF-8 (with the line), not readable."""
    from pathlib import Path

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
    import json
    from pathlib import Path

    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise error(f"cannot read {path}: {e}") from None
    if not isinstance(data, dict):
        raise error(f"cannot read {path}: a JSON object was expected, found {type(data).__name__}")
    return data
