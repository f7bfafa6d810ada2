"""The Jinja ``chat_template`` of an export, generated from the one MOSS turn format.

Every marker, end token and default body comes from :mod:`moss_train.format`, so the
template cannot drift from what SFT renders. Messages are OpenAI-style; each user message
opens a turn and the assistant message after it closes the turn with the four fields the model
writes or is given::

    {"role": "system", "content": meta instruction}                       (optional, first)
    {"role": "user", "content": text}                                     -> <|Human|>: text<eoh>\\n
    {"role": "assistant", "content": reply,                               -> <|Inner Thoughts|>: ...<eot>\\n
     "inner_thoughts": text or absent, "commands": text or absent,           <|Commands|>: ...<eoc>\\n
     "results": [result lines] or absent}                                    <|Results|>: ...<eor>\\n
                                                                             <|MOSS|>: reply<eom>\\n

An absent field renders as moss-003 does, `` None``. The rendering equals
``format.render(dialogue_from_messages(messages))``. A conversation ending with a user message
is a prompt: the model continues with ``<|Inner Thoughts|>:`` itself (as in
``format.prompt_segments``), so ``add_generation_prompt`` adds nothing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from moss_train import format as moss_format

ROLE_SYSTEM, ROLE_USER, ROLE_ASSISTANT = "system", "user", "assistant"
# Assistant-message keys of the fields besides the reply (the reply is "content").
ASSISTANT_FIELD_KEYS = {
    moss_format.INNER_THOUGHTS: "inner_thoughts",
    moss_format.COMMANDS: "commands",
    moss_format.RESULTS: "results",
}


def _literal(text: str) -> str:
    """A Jinja string literal (Jinja unescapes backslash sequences as Python does)."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"


def _text_body(expression: str) -> str:
    """Jinja for a field body: " " + text, or moss-003's " None" when the text is absent."""
    none = _literal(moss_format.NONE_BODY)
    return f"({expression} is defined and {expression} is not none) and (' ' ~ {expression}) or {none}"


def _results_body(expression: str) -> str:
    """Jinja for the results block: "\\n" + lines + "\\n", or " None" without lines."""
    none, newline = _literal(moss_format.NONE_BODY), _literal("\n")
    return f"({expression} is defined and {expression}) and ({newline} ~ {expression} | join({newline}) ~ {newline}) or {none}"


def _field(role: str, body: str) -> str:
    spec = moss_format.FIELD_BY_ROLE[role]
    return f"{{{{ {_literal(spec.prefix)} ~ ({body}) ~ {_literal(spec.suffix)} }}}}"


def build_chat_template() -> str:
    human = _field(moss_format.HUMAN, "' ' ~ message['content']")
    assistant = "".join(
        _field(role, _results_body(f"message['{key}']") if role == moss_format.RESULTS else _text_body(f"message['{key}']"))
        for role, key in ASSISTANT_FIELD_KEYS.items()
    ) + _field(moss_format.MOSS, "' ' ~ message['content']")
    return (
        "{%- for message in messages -%}"
        f"{{%- if message['role'] == '{ROLE_SYSTEM}' -%}}{{{{ message['content'] }}}}"
        f"{{%- elif message['role'] == '{ROLE_USER}' -%}}{human}"
        f"{{%- elif message['role'] == '{ROLE_ASSISTANT}' -%}}{assistant}"
        "{%- else -%}{{ raise_exception('MOSS messages have the roles system, user, assistant; got ' ~ message['role']) }}"
        "{%- endif -%}"
        "{%- endfor -%}"
    )


def dialogue_from_messages(messages: Sequence[Mapping]) -> moss_format.Dialogue:
    """The Dialogue those messages describe (what the template renders), for checking and for
    callers that hold messages. A trailing user message is left out (it is the prompt's end)."""
    meta = ""
    turns: list[moss_format.Turn] = []
    human = None
    for message in messages:
        role = message["role"]
        if role == ROLE_SYSTEM:
            meta = message["content"]
        elif role == ROLE_USER:
            human = message["content"]
        elif role == ROLE_ASSISTANT:
            if human is None:
                raise ValueError("an assistant message must follow a user message")
            turns.append(
                moss_format.Turn.from_text(
                    human=human,
                    moss=message["content"],
                    inner_thoughts=message.get("inner_thoughts"),
                    commands=message.get("commands"),
                    results=message.get("results"),
                )
            )
            human = None
        else:
            raise ValueError(f"unknown role {role!r}")
    return moss_format.Dialogue(meta, turns)


def render_messages(messages: Sequence[Mapping]) -> str:
    """The MOSS text of messages, by the format module (a trailing user message included)."""
    dialogue = dialogue_from_messages(messages)
    if messages and messages[-1]["role"] == ROLE_USER:
        segments = moss_format.prompt_segments(dialogue.meta_instruction, dialogue.turns, messages[-1]["content"])
        return "".join(segment.text for segment in segments)
    return moss_format.render(dialogue)
