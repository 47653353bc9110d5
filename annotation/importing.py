"""Reading pair files (JSON Lines) into validated records. No database here: the caller sees every
bad line, each error naming its line number, before anything is written."""

import json
import math
import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from annotation.agreement import CHOICES

PromptContent = str | list[dict[str, str]]

PAIR_FIELDS = {"prompt", "response_a", "response_b", "meta", "source_a", "source_b", "gold"}
TRANSCRIPT_FIELDS = {"chosen", "rejected"}
ROLES = {"system", "user", "assistant"}
_TURN = re.compile(r"\n\n(Human|Assistant):")
# The length of Response.source, which annotation.models takes from here (this module imports no Django).
SOURCE_MAX_LENGTH = 200
# How deep a field's value (meta, in practice) may nest lists and objects; PostgreSQL's jsonb and
# Python's own JSON code recurse on nesting, so unbounded depth would end in a RecursionError.
MAX_NESTING = 20


@dataclass(frozen=True)
class PairRecord:
    line: int
    prompt: PromptContent
    response_a: str
    response_b: str
    source_a: str = ""
    source_b: str = ""
    meta: dict[str, Any] = field(default_factory=dict)
    gold_choice: str = ""


class _LineError(Exception):
    pass


@dataclass(frozen=True)
class _HugeInteger:
    """Stands in for a JSON integer with more digits than Python converts, so the field can be named."""

    digits: int


def text_problem(text: str, *, max_length: int | None = None) -> str | None:
    """Why a PostgreSQL text column cannot hold this text, or None when it can."""
    if max_length is not None and len(text) > max_length:
        return f"is {len(text):,} characters, over the limit of {max_length:,}"
    if "\x00" in text:
        return "holds a NUL character"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        return f"holds a lone surrogate (U+{ord(text[error.start]):04X}), which UTF-8 cannot encode"
    return None


def parse_pair_lines(lines: Iterable[bytes], *, max_line_bytes: int) -> tuple[list[PairRecord], list[str]]:
    """Parse raw lines; return the good records and one error per bad line (none when all is well)."""
    records: list[PairRecord] = []
    errors: list[str] = []
    for number, raw in enumerate(lines, start=1):
        try:
            record = _parse_line(number, raw, max_line_bytes)
        except _LineError as error:
            errors.append(f"line {number}: {error}")
            continue
        if record is not None:
            records.append(record)
    if not records and not errors:
        errors.append("the file holds no pairs")
    return records, errors


def _parse_line(number: int, raw: bytes, max_line_bytes: int) -> PairRecord | None:
    if len(raw) > max_line_bytes:
        raise _LineError(f"line is {len(raw):,} bytes, over the limit of {max_line_bytes:,}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise _LineError(f"not valid UTF-8 (byte 0x{raw[error.start]:02x} at offset {error.start})") from None
    if not text.strip():
        return None
    try:
        value = json.loads(text, parse_int=_parse_int)
    except json.JSONDecodeError as error:
        raise _LineError(f"invalid JSON: {error.msg} at column {error.colno}") from None
    except RecursionError:
        raise _LineError(f"nested too deeply to parse (a field may nest at most {MAX_NESTING} levels)") from None
    if not isinstance(value, dict):
        raise _LineError(f"expected a JSON object, got {type(value).__name__}")
    for name, field_value in value.items():
        problem = _storable_problem(field_value)
        if problem:
            raise _LineError(f"field {name!r} {problem}")
    if TRANSCRIPT_FIELDS & value.keys():
        return _parse_transcript(number, value)
    return _parse_pair(number, value)


def _parse_int(digits: str) -> int | _HugeInteger:
    limit = sys.get_int_max_str_digits()
    if limit and len(digits.lstrip("-")) > limit:
        return _HugeInteger(len(digits.lstrip("-")))
    return int(digits)


def _storable_problem(value: Any) -> str | None:
    """What in a parsed JSON value the database cannot store: text it cannot hold, a number that
    is not finite or too long to convert, nesting deeper than MAX_NESTING. Walked without recursion."""
    pending = [(value, 0)]
    while pending:
        item, depth = pending.pop()
        if isinstance(item, dict | list):
            if depth == MAX_NESTING:
                return f"nests deeper than {MAX_NESTING} levels"
            children = item.values() if isinstance(item, dict) else item
            pending.extend((child, depth + 1) for child in children)
            if isinstance(item, dict):
                pending.extend((key, depth + 1) for key in item)
        elif isinstance(item, str):
            problem = text_problem(item)
            if problem:
                return problem
        elif isinstance(item, float) and not math.isfinite(item):
            return f"holds {json.dumps(item)}, which is not a finite number"
        elif isinstance(item, _HugeInteger):
            limit = sys.get_int_max_str_digits()
            return f"holds an integer of {item.digits:,} digits, over the limit of {limit:,}"
    return None


def _parse_pair(number: int, value: dict[str, Any]) -> PairRecord:
    unknown = sorted(value.keys() - PAIR_FIELDS)
    if unknown:
        raise _LineError(f"unknown field {unknown[0]!r} (expected prompt, response_a, response_b, meta)")
    if "prompt" not in value:
        raise _LineError("missing field 'prompt'")
    meta = value.get("meta", {})
    if not isinstance(meta, dict):
        raise _LineError(f"field 'meta' must be an object, got {type(meta).__name__}")
    response_a = _text(value, "response_a")
    response_b = _text(value, "response_b")
    if response_a == response_b:
        raise _LineError("response_a and response_b are identical")
    gold = value.get("gold", "")
    if gold not in ("", *CHOICES):
        raise _LineError(f"field 'gold' must be one of {', '.join(CHOICES)}, got {gold!r}")
    return PairRecord(
        line=number,
        prompt=_prompt(value["prompt"]),
        response_a=response_a,
        response_b=response_b,
        source_a=_source(value, "source_a"),
        source_b=_source(value, "source_b"),
        meta=meta,
        gold_choice=gold,
    )


def _parse_transcript(number: int, value: dict[str, Any]) -> PairRecord:
    """The hh-rlhf layout: two whole dialogues sharing every turn but the last Assistant turn."""
    unknown = sorted(value.keys() - TRANSCRIPT_FIELDS)
    if unknown:
        raise _LineError(f"unknown field {unknown[0]!r} (expected chosen, rejected)")
    chosen_turns = split_transcript(_text(value, "chosen"), "chosen")
    rejected_turns = split_transcript(_text(value, "rejected"), "rejected")
    if chosen_turns[:-1] != rejected_turns[:-1]:
        raise _LineError("chosen and rejected differ before their final Assistant turn")
    chosen, rejected = chosen_turns[-1]["content"], rejected_turns[-1]["content"]
    for name, answer in (("chosen", chosen), ("rejected", rejected)):
        if not answer:
            raise _LineError(f"field {name!r}: the final Assistant turn is empty")
    if chosen == rejected:
        raise _LineError("chosen and rejected end with the same answer")
    return PairRecord(
        line=number,
        prompt=chosen_turns[:-1],
        response_a=chosen,
        response_b=rejected,
        source_a="chosen",
        source_b="rejected",
        meta={"known_preference": "a", "format": "chosen_rejected"},
    )


def split_transcript(text: str, name: str) -> list[dict[str, str]]:
    """`\\n\\nHuman: ...\\n\\nAssistant: ...` into chat messages; the last one must be the assistant's."""
    pieces = _TURN.split(text)
    if pieces[0].strip():
        raise _LineError(f"field {name!r}: text before the first 'Human:' turn")
    turns = [
        {"role": "user" if speaker == "Human" else "assistant", "content": content.strip()}
        for speaker, content in zip(pieces[1::2], pieces[2::2], strict=True)
    ]
    if len(turns) < 2 or turns[-1]["role"] != "assistant":
        raise _LineError(f"field {name!r}: must end with an Assistant turn after at least one Human turn")
    return turns


def _text(value: dict[str, Any], name: str) -> str:
    if name not in value:
        raise _LineError(f"missing field {name!r}")
    text = value[name]
    if not isinstance(text, str):
        raise _LineError(f"field {name!r} must be a string, got {type(text).__name__}")
    if not text.strip():
        raise _LineError(f"field {name!r} is empty")
    return text


def _optional_text(value: dict[str, Any], name: str) -> str:
    if name not in value:
        return ""
    text = value[name]
    if not isinstance(text, str):
        raise _LineError(f"field {name!r} must be a string, got {type(text).__name__}")
    return text


def _source(value: dict[str, Any], name: str) -> str:
    source = _optional_text(value, name)
    problem = text_problem(source, max_length=SOURCE_MAX_LENGTH)
    if problem:
        raise _LineError(f"field {name!r} {problem}")
    return source


def _prompt(prompt: Any) -> PromptContent:
    if isinstance(prompt, str):
        if not prompt.strip():
            raise _LineError("field 'prompt' is empty")
        return prompt
    if not isinstance(prompt, list):
        raise _LineError(f"field 'prompt' must be a string or a list of messages, got {type(prompt).__name__}")
    if not prompt:
        raise _LineError("field 'prompt' is an empty list of messages")
    messages = []
    for index, message in enumerate(prompt):
        where = f"field 'prompt' message {index}"
        if not isinstance(message, dict) or set(message) != {"role", "content"}:
            raise _LineError(f"{where} must be an object with exactly 'role' and 'content'")
        role, content = message["role"], message["content"]
        if role not in ROLES:
            raise _LineError(f"{where}: role {role!r} is not one of {', '.join(sorted(ROLES))}")
        if not isinstance(content, str) or not content.strip():
            raise _LineError(f"{where}: content must be a non-empty string")
        messages.append({"role": role, "content": content})
    if messages[-1]["role"] != "user":
        raise _LineError("field 'prompt': the last message must be the user's")
    return messages


def summarize_errors(errors: list[str], limit: int = 20) -> str:
    shown = "\n".join(errors[:limit])
    return shown if len(errors) <= limit else f"{shown}\n... and {len(errors) - limit} more bad lines"
