"""Dataset readers for SFT, reward-model and PPO rows, validating every row before training starts.

Sources: ``.jsonl`` and ``.json`` files, ``.parquet`` files, directories written by
``datasets.Dataset.save_to_disk``, and anything else ``datasets.load_dataset`` accepts (a local data
directory or a hub name). The first malformed row raises :class:`DataError` naming the file and the
1-based line (JSON Lines) or the 0-based row index (JSON arrays, Parquet, HF datasets) and the fault.
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable
from pathlib import Path

from .features import check_messages

KINDS = ("sft", "rm", "ppo")
_FILE_SUFFIXES = (".jsonl", ".json", ".parquet")


class DataError(ValueError):
    """A malformed data source or row; ``str()`` names the source, the location and the fault."""

    def __init__(self, source, location: str | None, reason: str):
        self.source, self.location, self.reason = str(source), location, reason
        where = f"{self.source}, {location}" if location else self.source
        super().__init__(f"{where}: {reason}")


# --- row validation ---------------------------------------------------------------------------------------

def _present(row: dict, key: str) -> bool:
    # Columnar formats fill keys a row does not have with None (a union schema); treat those as absent.
    return row.get(key) is not None


def _text(row: dict, key: str) -> None:
    if not _present(row, key):
        raise ValueError(f"missing key {key!r} (row has keys {sorted(k for k in row if row[k] is not None)})")
    value = row[key]
    if not isinstance(value, str):
        raise ValueError(f"{key!r} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise ValueError(f"{key!r} is an empty string")


def _check_sft(row: dict) -> None:
    if _present(row, "messages"):
        if _present(row, "prompt") or _present(row, "response"):
            raise ValueError("row has both 'messages' and 'prompt'/'response'; use one form")
        check_messages(row["messages"])
        return
    if not (_present(row, "prompt") or _present(row, "response")):
        raise ValueError(f"sft rows need 'prompt' and 'response', or 'messages' (row has keys {sorted(row)})")
    _text(row, "prompt")
    _text(row, "response")


def _check_rm(row: dict) -> None:
    for key in ("prompt", "chosen", "rejected"):
        _text(row, key)
    if _present(row, "margin"):
        margin = row["margin"]
        if isinstance(margin, bool) or not isinstance(margin, (int, float)):
            raise ValueError(f"'margin' must be a number, got {type(margin).__name__}")
        if not math.isfinite(margin):
            raise ValueError(f"'margin' must be finite, got {margin}")


def _check_ppo(row: dict) -> None:
    _text(row, "prompt")


_CHECKS: dict[str, Callable[[dict], None]] = {"sft": _check_sft, "rm": _check_rm, "ppo": _check_ppo}


class Rows(list):
    """Validated rows (dicts), with ``locations[i]`` saying where row i came from (``"line 7"`` of a
    jsonl file, ``"row index 3"``), so errors found later (tokenization, length) still name the line."""

    def __init__(self, rows: list[dict], locations: list[str]):
        super().__init__(rows)
        self.locations = locations


def validate_rows(rows: Iterable[tuple[str, object]], *, kind: str, source) -> Rows:
    """Check ``(location, row)`` pairs for ``kind``; return the rows, or raise :class:`DataError` at
    the first bad one. Keys whose value is None are dropped from the returned rows (columnar formats
    fill the keys a row lacks with None), so ``"margin" in row`` means the row has a margin."""
    check = _CHECKS[kind]
    out, locations = [], []
    for location, row in rows:
        if not isinstance(row, dict):
            raise DataError(source, location, f"expected an object (dict), got {type(row).__name__}")
        try:
            check(row)
        except ValueError as err:
            raise DataError(source, location, f"bad {kind} row: {err}") from None
        out.append({k: v for k, v in row.items() if v is not None})
        locations.append(location)
    if not out:
        raise DataError(source, None, f"no {kind} rows")
    return Rows(out, locations)


# --- sources ----------------------------------------------------------------------------------------------

def _json_fault(err: json.JSONDecodeError) -> str:
    return f"bad JSON at column {err.colno}: {err.msg.removesuffix(' at')}"


def _utf8_fault(err: UnicodeDecodeError, data: bytes) -> str:
    column = err.start - (data.rfind(b"\n", 0, err.start) + 1) + 1
    return f"not UTF-8 text: byte 0x{data[err.start]:02x} at column {column}"


def _jsonl_rows(path: Path):
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataError(path, f"line {lineno}", _utf8_fault(err, raw)) from None
            if not line.strip():
                continue  # blank lines (a trailing newline, a separator) are not rows
            try:
                yield f"line {lineno}", json.loads(line.rstrip("\r\n"))
            except json.JSONDecodeError as err:
                raise DataError(path, f"line {lineno}", _json_fault(err)) from None


def _json_rows(path: Path, split: str):
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        lineno = raw.count(b"\n", 0, err.start) + 1
        raise DataError(path, f"line {lineno}", _utf8_fault(err, raw)) from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(path, f"line {err.lineno}", _json_fault(err)) from None
    if isinstance(data, dict):
        # {"train": [...], "test": [...]} or {"data": [...]}
        key = split if split in data else "data" if "data" in data else None
        if key is None or not isinstance(data[key], list):
            raise DataError(path, None, f"a JSON object must map split {split!r} (or 'data') to a list "
                                        f"of rows; keys are {sorted(data)}")
        data = data[key]
    if not isinstance(data, list):
        raise DataError(path, None, f"expected a list of rows, got {type(data).__name__}")
    return ((f"row index {i}", row) for i, row in enumerate(data))


def _parquet_rows(path: Path):
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as err:  # pyarrow raises several types for unreadable files
        raise DataError(path, None, f"cannot read Parquet: {err}") from None
    return ((f"row index {i}", row) for i, row in enumerate(table.to_pylist()))


def _hf_rows(source: str, split: str):
    import datasets

    path = Path(source)
    is_saved = path.is_dir() and any((path / name).exists()
                                     for name in ("dataset_info.json", "state.json", "dataset_dict.json"))
    try:
        ds = datasets.load_from_disk(str(path)) if is_saved else datasets.load_dataset(source, split=split)
    except Exception as err:  # network, missing dataset, bad files: report them as a data error
        raise DataError(source, None, f"cannot load dataset: {type(err).__name__}: {err}") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(source, None, f"no split {split!r}; splits are {sorted(ds)}")
        ds = ds[split]
    return ((f"row index {i}", row) for i, row in enumerate(ds))


def read_rows(source: str | os.PathLike, *, kind: str, split: str = "train") -> list[dict]:
    """All rows of ``source`` as dicts, each checked for ``kind``:

    - ``"sft"``: ``{"prompt": str, "response": str}`` or ``{"messages": [{"role", "content"}, ...]}``
      (with at least one non-empty assistant turn);
    - ``"rm"``: ``{"prompt", "chosen", "rejected"}`` strings and an optional numeric ``"margin"``;
    - ``"ppo"``: ``{"prompt": str}``.

    Strings must be non-empty; other keys are kept as they are, except None values (absent in a
    columnar source), which are dropped. ``split`` picks the split of a
    dataset with several (and of a JSON object keyed by split). Raises :class:`DataError` (a
    ``ValueError``) at the first bad row or an unreadable source, before anything is trained.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    path = Path(source).expanduser()
    suffix = path.suffix.lower()
    if path.is_file():
        if suffix == ".jsonl":
            rows = _jsonl_rows(path)
        elif suffix == ".json":
            rows = _json_rows(path, split)
        elif suffix == ".parquet":
            rows = _parquet_rows(path)
        else:
            raise DataError(path, None, f"unsupported file type {suffix!r}; use one of {_FILE_SUFFIXES}")
    elif suffix in _FILE_SUFFIXES or (str(source).startswith((".", "/", "~")) and not path.exists()):
        raise DataError(path, None, "file not found")
    else:
        rows = _hf_rows(str(source), split)
    return validate_rows(rows, kind=kind, source=path if path.exists() else source)
