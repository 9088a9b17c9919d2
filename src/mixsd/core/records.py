"""The corpus record format (input of `mixsd mix` and `mixsd sft-targets`) and the target record format.

Corpus record (JSONL, one per line; see docs/formats.md):
    id       unique string; derived from a hash of prompt and answer when absent
    prompt   the question as the user asks it (the naive prompt)
    answer   y*, the ground-truth answer text
    context  what the expert sees beside the prompt (default: the answer)
    check    the string a generated target must contain as its final answer
             (default: the last \\boxed{...} of the answer, else the whole answer)
    system   optional system message
The chat layout of the paper's released data is accepted too:
    {"messages": [{"role": "system"?, ...}, {"role": "user", "content": ...}, {"role": "assistant", ...}], ...}

Target record (output of `mixsd mix` / `mixsd sft-targets`, input of `mixsd train`): a JSON object with
at least `id`, `prompt_ids` and `target_ids`; training uses those token ids exactly as stored.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from mixsd.core.answers import last_boxed
from mixsd.core.files import InputError, read_jsonl, sha256_text


@dataclass(frozen=True)
class Fact:
    """One piece of knowledge to inject: a question, its answer, and what the expert is shown."""

    id: str
    prompt: str
    answer: str
    context: str
    check: str
    system: str | None = None

    def to_json(self) -> dict[str, Any]:
        row = {
            "id": self.id,
            "prompt": self.prompt,
            "answer": self.answer,
            "context": self.context,
            "check": self.check,
        }
        if self.system is not None:
            row["system"] = self.system
        return row


def default_check(answer: str) -> str:
    boxed = last_boxed(answer)
    return boxed if boxed is not None else answer.strip()


def make_fact(
    prompt: str,
    answer: str,
    *,
    id: str | None = None,
    context: str | None = None,
    check: str | None = None,
    system: str | None = None,
) -> Fact:
    """Build a Fact, filling the defaults exactly as the file reader does."""
    if id is None:
        id = sha256_text(prompt + "\x00" + answer)[:16]
    return Fact(
        id=id,
        prompt=prompt,
        answer=answer,
        context=answer if context is None else context,
        check=default_check(answer) if check is None else check,
        system=system,
    )


def _string_field(
    obj: dict[str, Any], name: str, path: os.PathLike | str, line: int, *, required: bool
) -> str | None:
    if name not in obj or obj[name] is None:
        if required:
            raise InputError("missing required field", path, line, name)
        return None
    value = obj[name]
    if not isinstance(value, str):
        raise InputError(f"expected a string, got {type(value).__name__}", path, line, name)
    if required and not value.strip():
        raise InputError("must not be empty", path, line, name)
    return value


def _from_messages(obj: dict[str, Any], path: os.PathLike | str, line: int) -> dict[str, Any]:
    messages = obj["messages"]
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise InputError("expected a list of {role, content} objects", path, line, "messages")
    by_role: dict[str, str] = {}
    for i, message in enumerate(messages):
        role, content = message.get("role"), message.get("content")
        if role not in ("system", "user", "assistant") or not isinstance(content, str):
            raise InputError(
                "each message needs a role (system/user/assistant) and string content",
                path,
                line,
                f"messages[{i}]",
            )
        if role in by_role:
            raise InputError(
                f"more than one '{role}' message; only single-turn records are supported",
                path,
                line,
                f"messages[{i}]",
            )
        by_role[role] = content
    for role in ("user", "assistant"):
        if role not in by_role:
            raise InputError(f"no '{role}' message", path, line, "messages")
    converted = {k: v for k, v in obj.items() if k != "messages"}
    converted.update(prompt=by_role["user"], answer=by_role["assistant"])
    if "system" in by_role:
        converted.setdefault("system", by_role["system"])
    return converted


def load_corpus(path: str | os.PathLike) -> list[Fact]:
    """Read and validate a whole corpus file before any work is done; raise InputError on the first bad line."""
    facts: list[Fact] = []
    seen: dict[str, int] = {}
    for line, obj in read_jsonl(path):
        if "messages" in obj and "prompt" not in obj:
            obj = _from_messages(obj, path, line)
        prompt = _string_field(obj, "prompt", path, line, required=True)
        answer = _string_field(obj, "answer", path, line, required=True)
        context = _string_field(obj, "context", path, line, required=False)
        check = _string_field(obj, "check", path, line, required=False)
        system = _string_field(obj, "system", path, line, required=False)
        record_id = obj.get("id")
        # bool is a subclass of int in Python, but `true` is no id
        if record_id is not None and (not isinstance(record_id, str | int) or isinstance(record_id, bool)):
            raise InputError(f"expected a string or an integer, got {json_type(record_id)}", path, line, "id")
        fact = make_fact(
            prompt,
            answer,
            id=None if record_id is None else str(record_id),
            context=context,
            check=check,
            system=system,
        )
        if not fact.check.strip():
            raise InputError("the answer check is empty", path, line, "check")
        if fact.id in seen:
            raise InputError(f"duplicate id '{fact.id}' (first on line {seen[fact.id]})", path, line, "id")
        seen[fact.id] = line
        facts.append(fact)
    if not facts:
        raise InputError("no records", path)
    return facts


def json_type(value: Any) -> str:
    """The JSON name of a parsed value's type, for messages about a user's file."""
    names = {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "a list"}
    return "null" if value is None else names.get(type(value), "an object")


def _is_token_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _int_list(
    obj: dict[str, Any], name: str, path: os.PathLike | str, line: int, *, allow_empty: bool
) -> list[int]:
    value = obj.get(name)
    if not isinstance(value, list) or not all(_is_token_id(t) for t in value):
        raise InputError("expected a list of non-negative integer token ids", path, line, name)
    if not value and not allow_empty:
        raise InputError("must not be empty", path, line, name)
    return value


def load_targets(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Read a target file (from `mixsd mix` or `mixsd sft-targets`), validating the fields training uses."""
    rows = []
    for line, obj in read_jsonl(path):
        if not isinstance(obj.get("id"), str):
            raise InputError("missing or non-string id", path, line, "id")
        _int_list(obj, "prompt_ids", path, line, allow_empty=False)
        _int_list(obj, "target_ids", path, line, allow_empty=False)
        rows.append(obj)
    if not rows:
        raise InputError("no records", path)
    return rows
