"""The data layer: read user datasets and normalize them to TRL's conversational format.

Sources (``read_records``): a ``.jsonl`` file (one JSON object per line), a ``.json`` file (an
array of objects, an object holding one list of rows under a key such as ``"data"``, or JSON
Lines content), a ``.parquet`` file, a folder written by ``datasets``' ``save_to_disk``
(a ``Dataset``, or a ``DatasetDict`` from which ``split`` is taken), or a Hugging Face Hub id
such as ``org/name`` when no such local path exists.

Every row is normalized (``normalize_row``) to one of three shapes, by ``kind``:

* ``sft``:        ``{"prompt": [messages], "completion": [final assistant message]}``
* ``preference``: ``{"prompt": [messages], "chosen": [messages], "rejected": [messages]}``
* ``prompt``:     ``{"prompt": [messages]}`` (prompts for generation)

A message is ``{"role": "system" | "user" | "assistant", "content": str}``. The input schema is
detected per row from its keys:

* TRL ``messages``: a list of ``{role, content}`` (or ``{from, value}``) messages. For ``sft`` it
  must end with an assistant turn (the completion); for ``prompt`` a final assistant turn is
  dropped.
* TRL ``prompt``/``completion`` and ``prompt``/``chosen``/``rejected``: each a string (wrapped as
  a user or assistant message) or a list of messages; ``prompt`` alone for ``prompt``.
* TRL implicit prompt: only ``chosen`` and ``rejected``, full conversations sharing a prefix;
  the shared prefix becomes the prompt.
* Alpaca: ``instruction``, optional ``input``, ``output`` (optional for ``prompt``; ``chosen``/
  ``rejected`` strings instead for ``preference``), optional ``system`` and ``history``
  (``[[user, assistant], ...]`` turns before the instruction).
* ShareGPT: ``conversations`` of ``{from, value}`` with ``from`` in system/human/gpt, optional
  top-level ``system``; for ``preference``, ``chosen`` and ``rejected`` are one ``{from, value}``
  message (or a list of them) answering the conversation.

Plain ``text`` rows (language modeling) are not accepted for SFT. Columns outside the detected
schema (``answer``, ``prompt_id``, ...) are kept unchanged, except the TRL column names
(``prompt``, ``completion``, ``chosen``, ``rejected``, ``messages``) which would change how TRL
reads the row, and format columns that are null (as parquet files fill missing columns).

Every problem raises ``DataError`` with one line that names the file and line (``FILE:LINE``
for JSONL) or row (``FILE row N``) and says how to fix it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Callable, NamedTuple

from align.core.errors import DataError, first_line

__all__ = ["FORMATS", "read_records", "normalize_row", "load_rows", "load_dataset"]

FORMATS: dict[str, str] = {
    "messages": "messages (TRL conversational)",
    "prompt_completion": "prompt/completion (TRL)",
    "prompt_only": "prompt (TRL prompt-only)",
    "preference": "prompt/chosen/rejected (TRL)",
    "implicit_preference": "chosen/rejected with a shared prompt (TRL implicit prompt)",
    "sharegpt": "conversations (ShareGPT)",
    "sharegpt_preference": "conversations + chosen/rejected (ShareGPT)",
    "alpaca": "instruction/input/output (Alpaca)",
    "alpaca_prompt": "instruction/input (Alpaca)",
    "alpaca_preference": "instruction/input + chosen/rejected (Alpaca)",
}

_TRL_COLUMNS = frozenset({"prompt", "completion", "chosen", "rejected", "messages"})
_FORMAT_COLUMNS = _TRL_COLUMNS | {"conversations", "instruction", "input", "output", "system", "history"}
_DATA_SUFFIXES = (".jsonl", ".json", ".parquet")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
_ROW_LIST_KEYS = ("data", "rows", "examples", "train", "instances", "records")

# ---------------------------------------------------------------------------------------------
# Messages
# ---------------------------------------------------------------------------------------------

# Message key style -> (content key, accepted role names -> role, role names listed in errors).
_STYLES = {
    "role": ("content", {"system": "system", "user": "user", "assistant": "assistant"}, "system, user, assistant"),
    "from": (
        "value",
        {"system": "system", "human": "user", "gpt": "assistant", "user": "user", "assistant": "assistant"},
        "system, human, gpt",
    ),
}


def _type(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _message(msg: Any, field: str, where: str) -> dict:
    """One ``{role, content}`` or ``{from, value}`` message -> ``{"role", "content"}``."""
    if not isinstance(msg, dict):
        raise DataError(f"{where}: {field} must be a message object with role and content, got {_type(msg)}")
    style = "role" if "role" in msg else "from" if "from" in msg else None
    if style is None:
        raise DataError(
            f"{where}: {field} has no 'role' (or 'from') key (has: "
            f"{', '.join(msg) or 'nothing'}); give each message role and content"
        )
    content_key, roles, listed = _STYLES[style]
    role = msg[style]
    if role not in roles:
        raise DataError(f"{where}: {field} has unknown {style} {role!r}; use one of: {listed}")
    content = msg.get(content_key)
    if not isinstance(content, str):
        raise DataError(
            f"{where}: {field}.{content_key} must be a string, got {_type(content)}; "
            f"give each message its text as a string"
        )
    return {"role": roles[role], "content": content}


def _messages(value: Any, field: str, where: str) -> list[dict]:
    """A non-empty list of messages (either key style) -> normalized messages."""
    if not isinstance(value, list):
        raise DataError(f"{where}: '{field}' must be a list of messages, got {_type(value)}")
    if not value:
        raise DataError(f"{where}: empty conversation in '{field}'; give it at least one message")
    return [_message(m, f"{field}[{i}]", where) for i, m in enumerate(value)]


def _turns(value: Any, field: str, role: str, where: str) -> list[dict]:
    """A string (wrapped as one ``role`` message) or a list of messages."""
    if isinstance(value, str):
        if role == "user" and not value:
            raise DataError(f"{where}: empty conversation: '{field}' is an empty string; give it the prompt text")
        return [{"role": role, "content": value}]
    if isinstance(value, list):
        return _messages(value, field, where)
    raise DataError(f"{where}: '{field}' must be a string or a list of messages, got {_type(value)}")


def _responses(value: Any, field: str, where: str) -> list[dict]:
    """A response: a string, one message object, or a list of messages (ShareGPT allows all)."""
    if isinstance(value, dict):
        return [_message(value, field, where)]
    return _turns(value, field, "assistant", where)


def _split_final_assistant(msgs: list[dict], field: str, where: str) -> tuple[list, list]:
    """(prompt, [final assistant turn]) of a conversation that must end with the assistant."""
    if msgs[-1]["role"] != "assistant":
        raise DataError(
            f"{where}: '{field}' ends with a {msgs[-1]['role']} turn; for SFT the "
            f"last message must be the assistant's reply (the completion)"
        )
    if len(msgs) == 1:
        raise DataError(
            f"{where}: empty conversation: '{field}' has no messages before the "
            f"final assistant turn; add the user turn it answers"
        )
    return msgs[:-1], msgs[-1:]


def _prompt_part(msgs: list[dict], field: str, where: str) -> list[dict]:
    """The prompt of a conversation: everything before a final assistant turn, if any."""
    prompt = msgs[:-1] if msgs[-1]["role"] == "assistant" else msgs
    if not prompt:
        raise DataError(
            f"{where}: empty conversation: '{field}' has only an assistant turn; add the user turn to answer"
        )
    return prompt


# ---------------------------------------------------------------------------------------------
# Column access
# ---------------------------------------------------------------------------------------------


def _has(row: dict, *keys: str) -> bool:
    return any(row.get(k) is not None for k in keys)


def _require(row: dict, key: str, fmt: str, where: str) -> Any:
    if row.get(key) is None:
        raise DataError(
            f"{where}: missing column '{key}' for {FORMATS[fmt]} data (has: {_columns(row)}); add '{key}' to every row"
        )
    return row[key]


def _optional_str(row: dict, key: str, where: str) -> str:
    value = row.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise DataError(f"{where}: '{key}' must be a string, got {_type(value)}")
    return value


def _columns(row: dict) -> str:
    return ", ".join(str(k) for k in row) or "no columns"


# ---------------------------------------------------------------------------------------------
# Per-format conversation builders
# ---------------------------------------------------------------------------------------------


def _system(row: dict, where: str) -> list[dict]:
    text = _optional_str(row, "system", where)
    return [{"role": "system", "content": text}] if text else []


def _alpaca_context(row: dict, fmt: str, where: str) -> list[dict]:
    """Alpaca system + history + the instruction (with input) as the final user turn."""
    instruction = _require(row, "instruction", fmt, where)
    if not isinstance(instruction, str):
        raise DataError(f"{where}: 'instruction' must be a string, got {_type(instruction)}")
    user = "\n".join(p for p in (instruction, _optional_str(row, "input", where)) if p)
    if not user:
        raise DataError(
            f"{where}: empty conversation: 'instruction' and 'input' are both empty; give the instruction text"
        )
    return [*_system(row, where), *_alpaca_history(row.get("history"), where), {"role": "user", "content": user}]


def _alpaca_history(history: Any, where: str) -> list[dict]:
    if history is None:
        return []
    if not isinstance(history, list):
        raise DataError(f"{where}: 'history' must be a list of [user, assistant] pairs, got {_type(history)}")
    out = []
    for i, pair in enumerate(history):
        if not isinstance(pair, (list, tuple)) or len(pair) != 2 or not all(isinstance(t, str) for t in pair):
            raise DataError(f"{where}: history[{i}] must be a [user, assistant] pair of strings")
        out += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    return out


def _sharegpt(row: dict, fmt: str, where: str) -> list[dict]:
    """ShareGPT conversations (mapped), after the optional top-level system prompt."""
    convo = _messages(_require(row, "conversations", fmt, where), "conversations", where)
    return [*_system(row, where), *convo]


def _implicit_prompt(row: dict, where: str) -> dict:
    fmt = "implicit_preference"
    chosen, rejected = (_require(row, k, fmt, where) for k in ("chosen", "rejected"))
    if not (isinstance(chosen, list) and isinstance(rejected, list)):
        raise DataError(
            f"{where}: 'chosen' and 'rejected' without a 'prompt' must be full "
            f"conversations (lists of messages); for plain strings add a "
            f"'prompt' column"
        )
    chosen, rejected = _messages(chosen, "chosen", where), _messages(rejected, "rejected", where)
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    if n == 0:
        raise DataError(
            f"{where}: 'chosen' and 'rejected' share no prompt (their first messages "
            f"differ); add a 'prompt' column or start both with the same messages"
        )
    for name, msgs in (("chosen", chosen), ("rejected", rejected)):
        if n == len(msgs):
            raise DataError(
                f"{where}: '{name}' has nothing after the prompt it shares with the "
                f"other response; end each with its own assistant reply"
            )
    return {"prompt": chosen[:n], "chosen": chosen[n:], "rejected": rejected[n:]}


def _preference(prompt: list[dict], row: dict, fmt: str, where: str) -> dict:
    chosen, rejected = (_require(row, k, fmt, where) for k in ("chosen", "rejected"))
    return {
        "prompt": prompt,
        "chosen": _responses(chosen, "chosen", where),
        "rejected": _responses(rejected, "rejected", where),
    }


# ---------------------------------------------------------------------------------------------
# Registry: per kind, the accepted formats in detection order
# ---------------------------------------------------------------------------------------------


class _Format(NamedTuple):
    name: str  # key of FORMATS
    columns: frozenset  # columns the format consumes (the rest are kept as extras)
    matches: Callable[[dict], bool]
    normalize: Callable[[dict, str], dict]


def _fmt(name: str, columns: str, matches, normalize) -> _Format:
    return _Format(name, frozenset(columns.split()), matches, normalize)


def _sft_messages(row: dict, where: str) -> dict:
    msgs = _messages(row["messages"], "messages", where)
    prompt, completion = _split_final_assistant(msgs, "messages", where)
    return {"prompt": prompt, "completion": completion}


def _sft_prompt_completion(row: dict, where: str) -> dict:
    prompt = _require(row, "prompt", "prompt_completion", where)
    completion = _require(row, "completion", "prompt_completion", where)
    return {
        "prompt": _turns(prompt, "prompt", "user", where),
        "completion": _turns(completion, "completion", "assistant", where),
    }


def _sft_sharegpt(row: dict, where: str) -> dict:
    prompt, completion = _split_final_assistant(_sharegpt(row, "sharegpt", where), "conversations", where)
    return {"prompt": prompt, "completion": completion}


def _sft_alpaca(row: dict, where: str) -> dict:
    output = _require(row, "output", "alpaca", where)
    if not isinstance(output, str):
        raise DataError(f"{where}: 'output' must be a string, got {_type(output)}")
    return {"prompt": _alpaca_context(row, "alpaca", where), "completion": [{"role": "assistant", "content": output}]}


def _pref_explicit(row: dict, where: str) -> dict:
    return _preference(_turns(row["prompt"], "prompt", "user", where), row, "preference", where)


def _pref_sharegpt(row: dict, where: str) -> dict:
    return _preference(_sharegpt(row, "sharegpt_preference", where), row, "sharegpt_preference", where)


def _pref_alpaca(row: dict, where: str) -> dict:
    return _preference(_alpaca_context(row, "alpaca_preference", where), row, "alpaca_preference", where)


def _prompt_only(row: dict, where: str) -> dict:
    return {"prompt": _turns(row["prompt"], "prompt", "user", where)}


def _prompt_messages(row: dict, where: str) -> dict:
    msgs = _messages(row["messages"], "messages", where)
    return {"prompt": _prompt_part(msgs, "messages", where)}


def _prompt_sharegpt(row: dict, where: str) -> dict:
    return {"prompt": _prompt_part(_sharegpt(row, "sharegpt", where), "conversations", where)}


def _prompt_alpaca(row: dict, where: str) -> dict:
    return {"prompt": _alpaca_context(row, "alpaca_prompt", where)}


def _is_implicit(row: dict) -> bool:
    return _has(row, "chosen", "rejected") and not _has(row, "prompt", "conversations", "instruction")


_REGISTRY: dict[str, tuple[_Format, ...]] = {
    "sft": (
        _fmt("messages", "messages", lambda r: _has(r, "messages"), _sft_messages),
        _fmt(
            "prompt_completion", "prompt completion", lambda r: _has(r, "prompt", "completion"), _sft_prompt_completion
        ),
        _fmt("sharegpt", "conversations system", lambda r: _has(r, "conversations"), _sft_sharegpt),
        _fmt("alpaca", "instruction input output system history", lambda r: _has(r, "instruction"), _sft_alpaca),
    ),
    "preference": (
        _fmt("preference", "prompt chosen rejected", lambda r: _has(r, "prompt"), _pref_explicit),
        _fmt("implicit_preference", "chosen rejected", _is_implicit, _implicit_prompt),
        _fmt(
            "sharegpt_preference",
            "conversations system chosen rejected",
            lambda r: _has(r, "conversations"),
            _pref_sharegpt,
        ),
        _fmt(
            "alpaca_preference",
            "instruction input system history chosen rejected",
            lambda r: _has(r, "instruction"),
            _pref_alpaca,
        ),
    ),
    "prompt": (
        _fmt("prompt_only", "prompt", lambda r: _has(r, "prompt"), _prompt_only),
        _fmt("messages", "messages", lambda r: _has(r, "messages"), _prompt_messages),
        _fmt("sharegpt", "conversations system", lambda r: _has(r, "conversations"), _prompt_sharegpt),
        _fmt(
            "alpaca_prompt",
            "instruction input output system history",
            lambda r: _has(r, "instruction"),
            _prompt_alpaca,
        ),
    ),
}

# Recognisable but unsupported columns, per kind: the hint given instead of the generic error.
_UNSUPPORTED: dict[str, dict[str, str]] = {
    "sft": {
        "text": "plain 'text' rows (language modeling) are not supported for SFT; convert "
        "each row to prompt/completion or messages (a conversation ending with the "
        "assistant reply)"
    },
}


def _no_format(row: dict, kind: str, where: str) -> DataError:
    for column, hint in _UNSUPPORTED.get(kind, {}).items():
        if _has(row, column):
            return DataError(f"{where}: {hint}")
    expected = " | ".join(FORMATS[f.name] for f in _REGISTRY[kind])
    return DataError(f"{where}: no {kind} columns found (has: {_columns(row)}); expected one of: {expected}")


def _extras(row: dict, fmt: _Format, out: dict) -> dict:
    """Columns outside the format, minus TRL column names and null format columns."""
    return {
        k: v
        for k, v in row.items()
        if k not in fmt.columns and k not in out and k not in _TRL_COLUMNS and not (v is None and k in _FORMAT_COLUMNS)
    }


def normalize_row(row: dict, kind: str, where: str) -> dict:
    """Normalize one raw row to TRL's conversational format for ``kind`` (sft, preference,
    prompt); ``where`` ("data/x.jsonl:12", "data/x.json row 3") prefixes every error."""
    if kind not in _REGISTRY:
        raise ValueError(f"unknown data kind {kind!r}; use one of: {', '.join(_REGISTRY)}")
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a row object, got {_type(row)}")
    fmt = next((f for f in _REGISTRY[kind] if f.matches(row)), None)
    if fmt is None:
        raise _no_format(row, kind, where)
    out = fmt.normalize(row, where)
    return {**out, **_extras(row, fmt, out)}


# ---------------------------------------------------------------------------------------------
# Reading sources
# ---------------------------------------------------------------------------------------------


def _jsonl(text: str, spec: str) -> list[tuple[str, dict]]:
    rows = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{spec}:{n}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(
                f"{where}: invalid JSON ({e.msg}, column {e.colno}); each line must be one JSON object"
            ) from None
        if not isinstance(obj, dict):
            raise DataError(f"{where}: expected a JSON object, got {_type(obj)}; each line must be one JSON object")
        rows.append((where, obj))
    return rows


def _json_rows(data: Any, spec: str, split: str) -> list:
    """The list of rows in a parsed .json document."""
    if isinstance(data, list):
        return data
    if isinstance(data, dict):
        lists = [
            k
            for k, v in data.items()
            if isinstance(v, list) and k not in _FORMAT_COLUMNS and all(isinstance(x, dict) for x in v)
        ]
        for key in (split, *_ROW_LIST_KEYS):
            if key in lists:
                return data[key]
        if len(lists) == 1:
            return data[lists[0]]
        found = f"lists of rows under: {', '.join(lists)}" if lists else f"keys: {_columns(data)}"
        raise DataError(
            f"{spec}: expected a JSON array of row objects, or an object holding one "
            f'list of rows (e.g. under "data"); found an object with {found}'
        )
    raise DataError(f"{spec}: expected a JSON array of row objects, got {_type(data)}")


def _json(text: str, spec: str, split: str) -> list[tuple[str, dict]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # several top-level values: JSON Lines content
            return _jsonl(text, spec)
        raise DataError(
            f"{spec}:{e.lineno}: invalid JSON ({e.msg}, column {e.colno}); the file "
            f"must hold a JSON array of objects, or one JSON object per line"
        ) from None
    rows = _json_rows(data, spec, split)
    for i, row in enumerate(rows, start=1):
        if not isinstance(row, dict):
            raise DataError(
                f"{spec} row {i}: expected a JSON object, got {_type(row)}; each row must be one JSON object"
            )
    return [(f"{spec} row {i}", row) for i, row in enumerate(rows, start=1)]


def _numbered(rows: list[dict], spec: str) -> list[tuple[str, dict]]:
    return [(f"{spec} row {i}", row) for i, row in enumerate(rows, start=1)]


def _parquet(path: Path, spec: str) -> list[tuple[str, dict]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for unreadable files
        raise DataError(
            f"{spec}: cannot read parquet file ({type(e).__name__}: "
            f"{first_line(e, 'no details')}); write it with pandas, pyarrow or datasets"
        ) from None
    return _numbered(table.to_pylist(), spec)


def _saved_dataset(path: Path, spec: str, split: str) -> list[tuple[str, dict]]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:  # FileNotFoundError and friends for folders that are not datasets
        raise DataError(
            f"{spec}: not a dataset folder written by datasets' save_to_disk "
            f"({first_line(e, 'no details')}); point to such a folder or to a .jsonl, .json or "
            f".parquet file"
        ) from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(
                f"{spec}: no split '{split}' in this saved DatasetDict (has: "
                f"{', '.join(ds)}); choose one of those splits"
            )
        ds = ds[split]
    return _numbered(ds.to_list(), spec)


def _hub(spec: str, split: str) -> list[tuple[str, dict]]:
    import datasets

    try:
        ds = datasets.load_dataset(spec, split=split)
    except Exception as e:  # offline, not found, gated, bad split: all surface as one message
        raise DataError(
            f"dataset not found: {spec} does not exist locally and could not be "
            f"loaded from the Hugging Face Hub ({type(e).__name__}: {first_line(e, 'no details')}); "
            f"check the path, or the network and the Hub id/split"
        ) from None
    return _numbered(list(ds), spec)


def _looks_like_hub_id(spec: str) -> bool:
    return bool(_HUB_ID.match(spec)) and not spec.lower().endswith(_DATA_SUFFIXES)


def _read_file(path: Path, spec: str, split: str) -> list[tuple[str, dict]]:
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return _parquet(path, spec)
    if suffix not in (".jsonl", ".json"):
        raise DataError(
            f"{spec}: unsupported file type '{suffix or path.name}'; use a .jsonl, "
            f".json or .parquet file, or a folder written by save_to_disk"
        )
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{spec}: not UTF-8 text ({e.reason} at byte {e.start}); save the file as UTF-8") from None
    return _jsonl(text, spec) if suffix == ".jsonl" else _json(text, spec, split)


def _read_located(spec: str, split: str) -> list[tuple[str, dict]]:
    """Rows of ``spec`` paired with their location string (``FILE:LINE`` or ``FILE row N``)."""
    path = Path(spec).expanduser()
    if path.is_dir():
        rows = _saved_dataset(path, spec, split)
    elif path.is_file():
        rows = _read_file(path, spec, split)
    elif _looks_like_hub_id(spec):
        rows = _hub(spec, split)
    else:
        raise DataError(
            f"dataset not found: {spec}; give an existing .jsonl, .json or .parquet "
            f"file, a save_to_disk folder, or a Hugging Face Hub id (org/name)"
        )
    if not rows:
        raise DataError(f"{spec}: the dataset is empty (no rows); add at least one row")
    return rows


def read_records(spec: str, split: str = "train") -> list[dict]:
    """Raw rows of a .jsonl/.json/.parquet file, a save_to_disk folder (``split`` of a
    DatasetDict) or a Hugging Face Hub id; DataError if unreadable, missing or empty."""
    return [row for _, row in _read_located(spec, split)]


def load_rows(spec: str, kind: str, split: str = "train") -> list[dict]:
    """Read ``spec`` and normalize every row for ``kind``; errors name the file and line/row."""
    return [normalize_row(row, kind, where) for where, row in _read_located(spec, split)]


def load_dataset(spec: str, kind: str, split: str = "train"):
    """``load_rows`` as a ``datasets.Dataset`` (what TRL trainers take)."""
    import datasets
    import pyarrow as pa

    rows = load_rows(spec, kind, split)
    columns = list(dict.fromkeys(k for row in rows for k in row))  # union, first-seen order
    try:
        return datasets.Dataset.from_list([{k: row.get(k) for k in columns} for row in rows])
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        raise DataError(
            f"{spec}: cannot build a dataset ({first_line(e, 'no details')}); give each column one type in every row"
        ) from None
