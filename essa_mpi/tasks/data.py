"""Dataset rows from a Hugging Face id, a local JSONL file, or a directory of JSONL splits.

    rows = load_rows("../shared/data/gsm8k/train.jsonl")            # local file
    rows = load_rows("openai/gsm8k", split="train", name="main")     # hub (pip install -e ".[hub]")
    require_columns(rows, ["question", "answer"], "task.dataset")   # clear error naming the fix

Rows are plain dicts; a task turns them into ``{"prompt": str, ...}`` rows whose other keys are passed to
the reward as columns.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os


def read_jsonl(path: str) -> list:
    """Rows of a JSONL file; ValueError naming the file and line for bad JSON, non-objects or non-UTF-8."""
    rows = []
    try:
        with open(path, encoding="utf-8") as fh:
            for n, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}, line {n}: not valid JSON ({exc.msg}); fix or remove that "
                                     f"line.") from None
                if not isinstance(row, dict):
                    raise ValueError(f"{path}, line {n}: a JSON {type(row).__name__}, not an object; each line "
                                     f"must be one row such as {{\"prompt\": \"...\"}}.")
                rows.append(row)
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path} is not UTF-8 text (byte {exc.start} of line {len(rows) + 1} or after); save "
                         f"it as UTF-8.") from None
    return rows


# Rank 0 reads the datasets and broadcasts their rows (cli.load_task); the other ranks build the same task
# from them without opening a file or reaching the hub. {(src, split, name): rows}
_RECORD: dict | None = None
_GIVEN: dict | None = None


@contextlib.contextmanager
def recording():
    """Inside: every load_rows result is also kept in the yielded dict (a copy: tasks may edit their rows)."""
    global _RECORD
    _RECORD = {}
    try:
        yield _RECORD
    finally:
        _RECORD = None


@contextlib.contextmanager
def given(rows: dict):
    """Inside: load_rows answers from rows (recorded by recording()) instead of reading."""
    global _GIVEN
    _GIVEN = rows
    try:
        yield
    finally:
        _GIVEN = None


def load_rows(src: str, split: str = "train", name: str | None = None) -> list:
    """A JSONL file, ``<dir>/<split>.jsonl``, or split ``split`` of the hub dataset ``src``."""
    if _GIVEN is not None:
        return copy.deepcopy(_GIVEN[(src, split, name)])
    rows = read_rows(src, split, name)
    if _RECORD is not None:
        _RECORD[(src, split, name)] = copy.deepcopy(rows)
    return rows


def read_rows(src: str, split: str, name: str | None) -> list:
    if os.path.isfile(src):
        return read_jsonl(src)
    if os.path.isdir(src):
        path = os.path.join(src, f"{split}.jsonl")
        if not os.path.isfile(path):
            raise ValueError(f"{src} has no {split}.jsonl; give the JSONL file itself or add {split}.jsonl.")
        return read_jsonl(path)
    try:
        from datasets import load_dataset  # hub access only when a hub id is given
    except ImportError:
        raise ValueError(f"loading {src!r} by name needs the datasets package: pip install -e '.[hub]', or give "
                         f"a local JSONL path.") from None
    return [dict(r) for r in load_dataset(src, name, split=split)]


def require_columns(rows: list, columns: list, where: str) -> None:
    """Raise ValueError unless there are rows and every row has every column (the first bad row is named)."""
    if not rows:
        raise ValueError(f"{where} has no rows; give a dataset with at least one row.")
    for n, row in enumerate(rows, 1):
        missing = [c for c in columns if c not in row]
        if missing:
            raise ValueError(f"{where}: row {n} lacks the column(s) {missing} (it has {sorted(row)}); every row "
                             f"needs {columns}.")


def split_tail(rows: list, n_tail: int, where: str) -> tuple:
    """(rows[:-n_tail], rows[-n_tail:]): hold out the last n_tail rows for validation."""
    if n_tail and len(rows) <= n_tail:
        raise ValueError(f"{where} has {len(rows)} rows, not more than task.val_size={n_tail}; lower task.val_size "
                         f"or give task.val_dataset.")
    return (rows[: len(rows) - n_tail], rows[len(rows) - n_tail:]) if n_tail else (rows, [])


def held_out(rows: list, cfg, columns: list, src: str) -> tuple:
    """(train, val): val = the first task.val_size rows of task.val_dataset (checked for columns) when given,
    else the last task.val_size rows of ``rows`` (loaded from ``src``)."""
    if not cfg.val_dataset:
        return split_tail(rows, cfg.val_size, f"task.dataset={src}")
    val = load_rows(cfg.val_dataset, "train")[: cfg.val_size]
    require_columns(val, columns, f"task.val_dataset={cfg.val_dataset}")
    return rows, val


def sft_rows(src: str) -> list:
    """SFT rows ``{"prompt", "completion"}`` from task.sft_dataset."""
    rows = load_rows(src, "train")
    require_columns(rows, ["prompt", "completion"], f"task.sft_dataset={src}")
    return [{"prompt": r["prompt"], "completion": r["completion"]} for r in rows]
