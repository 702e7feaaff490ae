"""Reading the JSON files of a source folder (config.json, model_index.json, *.safetensors.index.json, a
safetensors header) so that every way one can be broken is a ValueError naming the file, never a traceback.

Why not plain `json.loads`: besides `JSONDecodeError` it raises `RecursionError` on deeply nested input (`[` x 100,000
is a 100 KB file), `UnicodeDecodeError` on bytes that are not UTF-8, and reading the file raises `OSError`s
(a folder where the file should be, no permission). Error messages quote values through `short_repr`, which stays
short and cannot recurse without bound on a nested value that did parse.
"""

from __future__ import annotations

import json
import reprlib
from pathlib import Path
from typing import Any

_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother, _REPR.maxlist, _REPR.maxdict = 3, 60, 60, 6, 6


def short_repr(value: Any) -> str:
    """repr() cut to a few levels and items (for quoting input in an error message)."""
    return _REPR.repr(value)


def parse_json(raw: bytes | str, where: str, error: type[ValueError] = ValueError, *,
               expect: type | None = dict, what: str = "not valid JSON") -> Any:
    """`raw` parsed as JSON; `error(f"{where}: ...")` on anything that is not a JSON value of type `expect`."""
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        value = json.loads(text)
    except UnicodeDecodeError as e:
        raise error(f"{where}: {what} (not UTF-8: {e})") from None
    except json.JSONDecodeError as e:
        raise error(f"{where}: {what} ({e})") from None
    except RecursionError:
        raise error(f"{where}: {what} (nested too deeply to be a real file)") from None
    if expect is not None and not isinstance(value, expect):
        raise error(f"{where}: expected a JSON {_JSON_NAMES.get(expect, expect.__name__)}, got "
                    f"{_JSON_NAMES.get(type(value), type(value).__name__)}")
    return value


def read_json(path: Path, error: type[ValueError] = ValueError, *, expect: type | None = dict) -> Any:
    """The JSON file at `path`; `error` naming the path when it cannot be read or parsed (see `parse_json`)."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise error(f"{path}: no such file") from None
    except IsADirectoryError:
        raise error(f"{path}: is a folder, expected a JSON file") from None
    except OSError as e:
        raise error(f"{path}: cannot read ({e.strerror or e})") from None
    return parse_json(raw, str(path), error, expect=expect)


_JSON_NAMES = {dict: "object", list: "array", str: "string", int: "integer", float: "number", bool: "boolean",
               type(None): "null"}

__all__ = ["parse_json", "read_json", "short_repr"]
