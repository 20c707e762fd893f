"""Prompt-file readers: txt, jsonl, GenEval metadata, csv and DPG-Bench prompt folders.

Every reader returns a list of :class:`PromptRecord` in file order (DPG-Bench folders in natural
item-id order) and raises :class:`PromptFileError` with the file, the line and the reason when a file
cannot be used. Files are decoded as UTF-8, and a UTF-8 byte order mark at the start is removed.
"""

from __future__ import annotations

import csv
import io
import json
import re
import unicodedata
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

PromptFileFormat = Literal["txt", "jsonl", "geneval", "csv", "dpg"]
PROMPT_FILE_FORMATS: tuple[str, ...] = get_args(PromptFileFormat)
_SUFFIX_FORMATS: dict[str, PromptFileFormat] = {".txt": "txt", ".jsonl": "jsonl", ".csv": "csv"}
_BOM = "\ufeff"


@dataclass(frozen=True)
class PromptRecord:
    """One prompt and the metadata of its source record (a GenEval record, a DPG item id, a csv row)."""

    prompt: str
    metadata: dict[str, Any] = field(default_factory=dict)


class PromptFileError(ValueError):
    """Error for a prompt file or folder that cannot be used, at ``path`` and ``line`` (1-based or None)."""

    def __init__(self, path: str | Path, reason: str, line: int | None = None) -> None:
        self.path = Path(path)
        self.line = line
        self.reason = reason
        location = f"{self.path}:{line}" if line is not None else str(self.path)
        super().__init__(f"{location}: {reason}")


def detect_format(path: str | Path) -> PromptFileFormat:
    """Return the format of a prompt path: ``dpg`` for a folder, else from the suffix (.txt, .jsonl, .csv)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"prompt file not found: {path}")
    if path.is_dir():
        return "dpg"
    detected = _SUFFIX_FORMATS.get(path.suffix.lower())
    if detected is None:
        raise PromptFileError(
            path,
            f"cannot tell the prompt format from the suffix {path.suffix!r}; use .txt, .jsonl or .csv, "
            "a DPG-Bench prompt folder, or set the format explicitly to one of "
            + ", ".join(PROMPT_FILE_FORMATS),
        )
    return detected


def read_prompts(path: str | Path, file_format: PromptFileFormat | None = None) -> list[PromptRecord]:
    """Read a prompt file or DPG-Bench folder. A ``file_format`` of None detects the format from the path."""
    if file_format is not None and file_format not in PROMPT_FILE_FORMATS:
        raise ValueError(
            f"unknown prompt file format {file_format!r}; expected one of {', '.join(PROMPT_FILE_FORMATS)}"
        )
    resolved_format = file_format or detect_format(path)
    if resolved_format == "txt":
        return read_txt_prompts(path)
    if resolved_format == "jsonl":
        return read_jsonl_prompts(path)
    if resolved_format == "geneval":
        return read_geneval_metadata(path)
    if resolved_format == "csv":
        return read_csv_prompts(path)
    return read_dpg_prompts(path)


def read_txt_prompts(path: str | Path) -> list[PromptRecord]:
    """Read one prompt per line, skipping blank and whitespace-only lines.

    Only the line ending (``\\n`` or ``\\r\\n``) and a byte order mark at the start of the file are
    removed. Leading and trailing spaces stay part of the prompt because the text is kept as written.
    Metadata is empty.
    """
    text = _read_text(path)
    records = []
    for line in text.split("\n"):
        prompt = line.removesuffix("\r")
        if prompt.strip():
            records.append(PromptRecord(prompt=prompt, metadata={}))
    return _require_records(path, records)


def read_jsonl_prompts(path: str | Path, prompt_key: str = "prompt") -> list[PromptRecord]:
    """Read one JSON object per line, each with a non-empty string under ``prompt_key``.

    The whole object, ``prompt_key`` included, becomes the metadata, so a record such as a GenEval
    line can be written back unchanged. Blank lines are skipped.
    """
    records = []
    for line_number, obj in _iter_json_objects(path):
        prompt = _check_prompt(path, line_number, obj, prompt_key)
        records.append(PromptRecord(prompt=prompt, metadata=obj))
    return _require_records(path, records)


def read_geneval_metadata(path: str | Path) -> list[PromptRecord]:
    """Read GenEval's ``evaluation_metadata.jsonl``: a jsonl whose lines also need ``tag`` and ``include``.

    Each record is kept whole as metadata (``tag``, ``include``, optional ``exclude``, ``prompt`` and
    any other keys) because the GenEval evaluator needs all of them.
    """
    records = []
    for line_number, obj in _iter_json_objects(path):
        prompt = _check_prompt(path, line_number, obj, "prompt")
        if not isinstance(obj.get("tag"), str):
            raise PromptFileError(
                path, "missing or non-string 'tag'; a GenEval record names its task tag", line_number
            )
        if not isinstance(obj.get("include"), list):
            raise PromptFileError(
                path,
                "missing or non-list 'include'; a GenEval record lists the objects to detect",
                line_number,
            )
        records.append(PromptRecord(prompt=prompt, metadata=obj))
    return _require_records(path, records)


def read_csv_prompts(path: str | Path, prompt_key: str = "prompt") -> list[PromptRecord]:
    """Read a csv with a header row that has a ``prompt_key`` column; every row becomes one record.

    The metadata is the whole row as strings, ``prompt_key`` included. Line numbers in errors count
    physical lines, so a quoted field with a line break moves them on. Fully empty rows are skipped.
    """
    text = _read_text(path)
    reader = csv.reader(io.StringIO(text, newline=""))
    header = next(reader, None)
    if header is None:
        raise PromptFileError(path, f"empty file; expected a header row with a {prompt_key!r} column")
    if prompt_key not in header:
        raise PromptFileError(
            path, f"missing {prompt_key!r} column in the header; found columns {header}", reader.line_num
        )

    records = []
    for row in reader:
        if not any(cell.strip() for cell in row):
            continue
        if len(row) != len(header):
            raise PromptFileError(
                path,
                f"row has {len(row)} fields but the header has {len(header)}; check quoting",
                reader.line_num,
            )
        metadata = dict(zip(header, row, strict=True))
        prompt = _check_prompt(path, reader.line_num, metadata, prompt_key)
        records.append(PromptRecord(prompt=prompt, metadata=metadata))
    return _require_records(path, records)


def read_dpg_prompts(folder: str | Path) -> list[PromptRecord]:
    """Read a DPG-Bench prompt folder: one dense prompt per ``<item_id>.txt``, metadata ``{"item_id": ...}``.

    Items are sorted by natural order of the id, so ``2`` comes before ``10`` and ``partiprompts9``
    before ``partiprompts10``. The item id is the file stem as a string because ids such as
    ``COCOval2014000000010363`` are not plain numbers. Entries whose name does not end in ``.txt``
    are ignored. Each file's text is kept whole except a trailing line ending and a byte order mark.
    """
    folder = Path(folder)
    if not folder.exists():
        raise FileNotFoundError(f"DPG-Bench prompt folder not found: {folder}")
    if not folder.is_dir():
        raise PromptFileError(folder, "expected a DPG-Bench prompt folder of <item_id>.txt files, got a file")

    files = sorted((p for p in folder.iterdir() if p.suffix == ".txt" and p.is_file()), key=_natural_key)
    records = []
    for prompt_path in files:
        prompt = _read_text(prompt_path).rstrip("\r\n")
        if not prompt.strip():
            raise PromptFileError(
                prompt_path, "empty DPG-Bench prompt file; each <item_id>.txt contains one prompt"
            )
        records.append(PromptRecord(prompt=prompt, metadata={"item_id": prompt_path.stem}))
    if not records:
        raise PromptFileError(folder, "no <item_id>.txt prompt files in the DPG-Bench prompt folder")
    return records


def safe_filename(prompt: str, index: int, max_length: int = 80) -> str:
    """Make an ASCII file stem (no extension) from a prompt and its index: ``00012_a_red_circle``.

    The zero-padded index comes first, so names are unique whenever indices are and sort in prompt
    order. Accents are dropped (``é`` becomes ``e``), and every other run of characters outside
    ``[A-Za-z0-9]`` becomes one ``_``, so slashes, dots and CJK text never reach the file system.
    A prompt with no ASCII letters or digits gives the index alone. The result has at most
    ``max_length`` characters.
    """
    if index < 0:
        raise ValueError(f"index must be >= 0, got {index}")
    prefix = f"{index:05d}"
    if max_length < len(prefix):
        raise ValueError(
            f"max_length={max_length} is too short for the index {prefix!r}; use at least {len(prefix)}"
        )

    ascii_text = unicodedata.normalize("NFKD", prompt).encode("ascii", "ignore").decode("ascii")
    slug = re.sub(r"[^A-Za-z0-9]+", "_", ascii_text).strip("_").lower()
    room = max_length - len(prefix) - 1
    slug = slug[:room].rstrip("_") if room > 0 else ""
    return f"{prefix}_{slug}" if slug else prefix


def _read_text(path: str | Path) -> str:
    """Read a whole file as UTF-8 and drop a leading byte order mark. A decoding error names its line."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"prompt file not found: {path}")
    if path.is_dir():
        raise PromptFileError(
            path, "expected a file but found a folder; read DPG-Bench prompt folders with the dpg format"
        )
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise PromptFileError(
            path, f"invalid UTF-8 at byte {error.start}; save the file as UTF-8", line
        ) from None
    return text.removeprefix(_BOM)


def _iter_json_objects(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (line number, object) for each non-blank line of a jsonl file."""
    text = _read_text(path)
    for line_number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as error:
            raise PromptFileError(
                path,
                f"invalid JSON ({error.msg} at column {error.colno}); each line must be one JSON object",
                line_number,
            ) from None
        if not isinstance(obj, dict):
            raise PromptFileError(path, f"expected a JSON object, got {type(obj).__name__}", line_number)
        yield line_number, obj


def _check_prompt(path: str | Path, line_number: int, record: Mapping[str, Any], prompt_key: str) -> str:
    """Return ``record[prompt_key]`` if it is a non-blank string, else raise PromptFileError for the line."""
    if prompt_key not in record:
        raise PromptFileError(path, f"missing {prompt_key!r} key; found keys {sorted(record)}", line_number)
    value = record[prompt_key]
    if not isinstance(value, str):
        raise PromptFileError(
            path, f"{prompt_key!r} must be a string, got {type(value).__name__}", line_number
        )
    if not value.strip():
        raise PromptFileError(path, f"empty {prompt_key!r}; every record needs a prompt text", line_number)
    return value


def _require_records(path: str | Path, records: list[PromptRecord]) -> list[PromptRecord]:
    if not records:
        raise PromptFileError(path, "contains no prompts; add at least one prompt record")
    return records


def _natural_key(path: Path) -> tuple[Any, ...]:
    """Return a sort key that compares digit runs as numbers. The stem breaks ties such as ``7``, ``007``."""
    parts = re.split(r"(\d+)", path.stem)
    # re.split with a capture group alternates text and digit runs, so even positions are str and odd are int.
    key = tuple(int(part) if position % 2 else part for position, part in enumerate(parts))
    return (key, path.stem)
