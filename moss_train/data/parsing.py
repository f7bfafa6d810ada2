"""Dialogue records -> conversations (:class:`Conversation`) in the MOSS turn format (moss_train/format.py).

Three input formats:

- ``moss003``  the moss-003 layout (``meta_instruction``, ``num_turns``, ``chat.turn_N`` with the
               five fields ``Human``, ``Inner Thoughts``, ``Commands``, ``Tool Responses``, ``MOSS``);
- ``messages`` OpenAI style ``{"messages": [{"role": "system"|"user"|"assistant", "content": ...}]}``;
- ``alpaca``   ``{"instruction", "input" (optional), "output"}``.

A record that cannot become a conversation raises :class:`RecordError` with one of the reasons
below (moss-data counts them and writes them to its rejects file). Rendering a conversation into
token ids and loss flags is moss_train/data/rendering.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from moss_train import format as fmt

FORMATS = ("moss003", "messages", "alpaca")

# Reasons a record is skipped (counted, and written to the rejects file by moss-data sft).
NOT_AN_OBJECT = "not_an_object"
UNKNOWN_FORMAT = "unknown_format"
MISSING_FIELD = "missing_field"
NON_STRING_CONTENT = "non_string_content"
NUM_TURNS_MISMATCH = "num_turns_mismatch"
WRONG_TURN_ORDER = "wrong_turn_order"
WRONG_ROLE_ORDER = "wrong_role_order"
UNKNOWN_ROLE = "unknown_role"
MALFORMED_FIELD = "malformed_field"
EMPTY_CONVERSATION = "empty_conversation"
FIRST_TURN_TOO_LONG = "first_turn_too_long"
TOO_LONG = "too_long"


class RecordError(ValueError):
    """A record that cannot become a conversation; `reason` is one of the names above."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass
class Conversation:
    dialogue: fmt.Dialogue
    category: str
    id: Any = None  # the record's conversation_id (int or str in moss-003), if any


def detect_format(record: dict) -> str:
    if "chat" in record:
        return "moss003"
    if "messages" in record:
        return "messages"
    if "instruction" in record and "output" in record:
        return "alpaca"
    raise RecordError(
        UNKNOWN_FORMAT, f"no 'chat', 'messages' or 'instruction'+'output' key (keys: {sorted(record)[:8]})"
    )


def parse_record(
    record: Any, format: str = "auto", meta_instruction: str | None = None, category_from: str = "plugins"
) -> Conversation:
    """One input record as a Conversation, or RecordError naming why not.

    `meta_instruction` replaces the record's own (moss003) or is used where a record has none
    (messages without a system message, alpaca); default: the MOSS meta instruction with no
    plugins. `category_from`: "plugins" (plain / calculator / ... / mix, from the capability
    lines) or "field" (the record's own ``category``, else "uncategorized").
    """
    if not isinstance(record, dict):
        raise RecordError(NOT_AN_OBJECT, f"a record must be a JSON object, got {type(record).__name__}")
    kind = detect_format(record) if format == "auto" else format
    parser = {"moss003": _parse_moss003, "messages": _parse_messages, "alpaca": _parse_alpaca}[kind]
    dialogue = parser(record, meta_instruction)
    if category_from == "field":
        category = record.get("category") if isinstance(record.get("category"), str) else "uncategorized"
    else:
        category = plugin_category(dialogue.meta_instruction)
    return Conversation(dialogue, _safe_name(category), record.get("conversation_id", record.get("id")))


def plugin_category(meta: str) -> str:
    """plain, one plugin's name, or mix (several plugins), from the meta instruction."""
    plugins = fmt.enabled_plugins(meta)
    return "plain" if not plugins else plugins[0] if len(plugins) == 1 else "mix"


def _safe_name(name: str) -> str:
    """A category as it can appear in a shard file name and a metric name."""
    cleaned = "".join(c if c.isalnum() or c in "-_" else "_" for c in name.strip())
    return cleaned or "uncategorized"


def _string(value: Any, where: str) -> str:
    if value is None:
        raise RecordError(MISSING_FIELD, f"{where} is missing")
    if not isinstance(value, str):
        raise RecordError(NON_STRING_CONTENT, f"{where} is {type(value).__name__}, not a string")
    return value


def _parse_moss003(record: dict, meta_override: str | None) -> fmt.Dialogue:
    meta = _string(record.get("meta_instruction"), "meta_instruction") if meta_override is None else meta_override
    chat = record.get("chat")
    if not isinstance(chat, dict):
        raise RecordError(
            MISSING_FIELD if chat is None else MALFORMED_FIELD, "chat must be an object of turn_1..turn_N"
        )
    if not chat:
        raise RecordError(EMPTY_CONVERSATION, "chat has no turns")
    num_turns = record.get("num_turns")
    if num_turns is not None:
        declared = int(num_turns) if isinstance(num_turns, str) and num_turns.strip().isdigit() else num_turns
        if isinstance(declared, bool) or not isinstance(declared, int) or declared != len(chat):
            raise RecordError(NUM_TURNS_MISMATCH, f"num_turns is {num_turns!r} but chat has {len(chat)} turns")
    expected = [f"turn_{i + 1}" for i in range(len(chat))]
    if list(chat) != expected:
        raise RecordError(WRONG_TURN_ORDER, f"turns are {list(chat)[:6]}, expected turn_1..turn_{len(chat)} in order")
    return fmt.Dialogue(meta, [_parse_moss003_turn(chat[key], key) for key in expected])


def _parse_moss003_turn(turn: Any, key: str) -> fmt.Turn:
    if not isinstance(turn, dict):
        raise RecordError(MALFORMED_FIELD, f"{key} is {type(turn).__name__}, not an object")
    bodies = {}
    for spec in fmt.FIELDS:
        text = _string(turn.get(spec.key), f"{key}.{spec.key}")
        if not (
            text.startswith(spec.prefix)
            and text.endswith(spec.suffix)
            and len(text) >= len(spec.prefix) + len(spec.suffix)
        ):
            raise RecordError(
                MALFORMED_FIELD,
                f"{key}.{spec.key} must be {spec.prefix!r} ... {spec.suffix!r}, got {text[:40]!r}...{text[-12:]!r}",
            )
        bodies[spec.role] = text[len(spec.prefix) : len(text) - len(spec.suffix)]
    return fmt.Turn(**bodies)


_HUMAN_ROLES = ("user", "human")
_ASSISTANT_ROLES = ("assistant",)


def _parse_messages(record: dict, meta_override: str | None) -> fmt.Dialogue:
    messages = record.get("messages")
    if not isinstance(messages, list):
        raise RecordError(MALFORMED_FIELD, f"messages must be a list, got {type(messages).__name__}")
    roles, contents = [], []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise RecordError(MALFORMED_FIELD, f"messages[{i}] is {type(message).__name__}, not an object")
        role = _string(message.get("role"), f"messages[{i}].role")
        if role not in ("system", *_HUMAN_ROLES, *_ASSISTANT_ROLES):
            raise RecordError(UNKNOWN_ROLE, f"messages[{i}].role is {role!r} (system, user or assistant)")
        roles.append(role)
        contents.append(_string(message.get("content"), f"messages[{i}].content"))
    system = None
    if roles and roles[0] == "system":
        system, roles, contents = contents[0], roles[1:], contents[1:]
    if not roles:
        raise RecordError(EMPTY_CONVERSATION, "no user / assistant messages")
    pattern_ok = len(roles) % 2 == 0 and all(
        (r in _HUMAN_ROLES) if i % 2 == 0 else (r in _ASSISTANT_ROLES) for i, r in enumerate(roles)
    )
    if not pattern_ok:
        raise RecordError(WRONG_ROLE_ORDER, f"roles {roles[:8]}: need [system,] then user, assistant pairs")
    turns = [fmt.Turn.from_text(human=contents[i], moss=contents[i + 1]) for i in range(0, len(roles), 2)]
    return fmt.Dialogue(_meta(meta_override, system), turns)


def _parse_alpaca(record: dict, meta_override: str | None) -> fmt.Dialogue:
    instruction = _string(record.get("instruction"), "instruction")
    extra = record.get("input")
    extra = "" if extra is None else _string(extra, "input")
    output = _string(record.get("output"), "output")
    human = instruction + ("\n\n" + extra if extra.strip() else "")
    system = _string(record["system"], "system") if record.get("system") is not None else None
    return fmt.Dialogue(_meta(meta_override, system), [fmt.Turn.from_text(human=human, moss=output)])


def _meta(override: str | None, system: str | None) -> str:
    """The recipe's meta instruction, else the record's system text, else MOSS's (no plugins)."""
    meta = override if override is not None else system if system is not None else fmt.meta_instruction()
    return meta if not meta or meta.endswith("\n") else meta + "\n"
