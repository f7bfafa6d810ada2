"""The Jinja ``chat_template`` of an export, generated from the one MOSS turn format.

Every marker, end token, default body, capability line and result layout comes from
:mod:`moss_train.format`, so the template cannot drift from what SFT renders. Messages follow
Hugging Face's conventions, mapped onto MOSS's fields::

    {"role": "system", "content": meta}          the whole meta instruction (optional, first);
                                                 without it: the one the model was trained with
                                                 (ChatFormat), its plugins enabled by `tools`
    {"role": "user", "content": text}            -> <|Human|>: text<eoh>\\n
    {"role": "assistant", "content": thoughts,   -> <|Inner Thoughts|>: thoughts<eot>\\n
     "tool_calls": [{"type": "function",            <|Commands|>: Calculate("23*17")<eoc>\\n
       "function": {"name": "Calculate",
                    "arguments": {"expression": "23*17"}}}]}
    {"role": "tool", "content": "391"}           -> <|Results|>:\\nCalculate("23*17") => '391'\\n<eor>\\n
                                                    (one line per tool message, in call order)
    {"role": "assistant", "content": reply}      -> <|MOSS|>: reply<eom>\\n

An assistant message straight after a user message, without ``tool_calls``, is a whole turn that
used no tool, rendered as MOSS renders one: ``<|Inner Thoughts|>: None<eot>`` (or its
``reasoning_content``), ``<|Commands|>: None<eoc>``, ``<|Results|>: None<eor>``, then the reply.
For data that fits no convention (moss-003 has turns like that) an assistant message may carry
MOSS's fields directly: ``inner_thoughts`` (= ``reasoning_content``), ``commands`` (the field's
text) and ``results`` (a list of result lines, or one text); ``messages_from_dialogue`` writes
them only where the HF form cannot say the same.

``tools=[...]``: HF tool schemas (or their names), by command (``Calculate``, ``Solve``,
``Search``, ``Text2Image``) or plugin name (``calculator``, ...); each enables its capability
line (:func:`tool_schema` gives the schemas). ``add_generation_prompt=True`` appends the start
of what the model writes next, as training taught it: ``<|Inner Thoughts|>:`` after a user
message, ``<|MOSS|>:`` after the tool messages. Pass one stops at ``<eoc>``
(generation_config.json), the caller runs the commands and appends the assistant message with
its ``tool_calls`` and one tool message per call, and pass two writes the reply (docs/hf_chat.md).

:func:`message_segments` is the same rendering in Python, as format segments: its text equals
the template's output and its per-segment encoding is what SFT trains on.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Optional

from moss_train import format as fmt

ROLE_SYSTEM, ROLE_USER, ROLE_ASSISTANT, ROLE_TOOL = "system", "user", "assistant", "tool"
IT, CMD, RES, REPLY, HUMAN = (
    fmt.FIELD_BY_ROLE[r] for r in (fmt.INNER_THOUGHTS, fmt.COMMANDS, fmt.RESULTS, fmt.MOSS, fmt.HUMAN)
)
ENABLEABLE = fmt.ENABLEABLE_PLUGINS
API_BY_PLUGIN = {plugin: fmt.plugin_api(plugin)[0] for plugin in ENABLEABLE}
# A tool is named by its command or its plugin name.
PLUGIN_BY_TOOL = {**{plugin: plugin for plugin in ENABLEABLE}, **{api: plugin for plugin, api in API_BY_PLUGIN.items()}}


class ChatTemplateError(ValueError):
    """Messages the MOSS format cannot render (the template raises the same message)."""


@dataclass(frozen=True)
class ChatFormat:
    """How the exported model was trained to be prompted: the meta instruction's preamble (the
    text before the capability lines; with ``capabilities`` False the whole meta instruction,
    for a model trained without capability lines) and, for a tag-conditioned model, its tag form
    (quality.json), whose best level the default meta instruction asks for."""

    preamble: str = fmt.MOSS_PREAMBLE
    capabilities: bool = True
    quality: Optional[Mapping] = None

    def meta_instruction(self, plugins: Sequence[str] = ()) -> str:
        """The default meta instruction, `plugins` enabled."""
        if not self.capabilities:
            if plugins:
                raise ChatTemplateError(NO_CAPABILITIES)
            return self.preamble + self.tag_suffix
        return fmt.meta_instruction(plugins, preamble=self.preamble) + self.tag_suffix

    @property
    def tag_suffix(self) -> str:
        """What follows the capability lines: the best level's tag line (tag-conditioned models)."""
        if not self.quality:
            return ""
        levels = int(self.quality["levels"])
        base = fmt.meta_instruction(preamble=self.preamble) if self.capabilities else self.preamble
        return fmt.with_quality(base, levels, levels, self.quality.get("template", fmt.QUALITY_TEMPLATE))[len(base) :]

    @classmethod
    def from_meta_instruction(cls, meta: str, quality: Optional[Mapping] = None) -> "ChatFormat":
        """The format of a model trained on `meta` (any of its dialogues' meta instructions)."""
        if quality:  # the tag line is the last line of a tag-conditioned meta instruction
            levels, template = int(quality["levels"]), quality.get("template", fmt.QUALITY_TEMPLATE)
            for level in range(1, levels + 1):
                meta = meta.removesuffix(fmt.quality_line(level, levels, template))
        preamble, header, _ = meta.partition(fmt.CAPABILITIES_HEADER)
        return cls(preamble if header else meta, capabilities=bool(header), quality=quality)


def tool_schema(plugin: str) -> dict:
    """The HF tool schema of a MOSS plugin (for ``apply_chat_template(tools=[...])``)."""
    name, parameter = fmt.plugin_api(plugin)
    label = next(label for p, label, _ in fmt.PLUGIN_CAPABILITIES if p == plugin)
    return {
        "type": "function",
        "function": {
            "name": name,
            "description": f"MOSS's {label.lower()}: {fmt.command(name, parameter)}",
            "parameters": {"type": "object", "properties": {parameter: {"type": "string"}}, "required": [parameter]},
        },
    }


# ================================================================== the Jinja template
def _literal(text: str) -> str:
    """A Jinja string literal (Jinja unescapes backslash sequences as Python does)."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"


def _mapping(items: Mapping[str, str]) -> str:
    return "{" + ", ".join(f"{_literal(k)}: {_literal(v)}" for k, v in items.items()) + "}"


def _raise(message_expression: str) -> str:
    return f"{{{{ raise_exception({message_expression}) }}}}"


def _is_set(expression: str) -> str:
    return f"({expression} is defined and {expression} is not none)"


def _field(spec: fmt.FieldSpec, body_expression: str) -> str:
    return f"{{{{ {_literal(spec.prefix)} ~ {body_expression} ~ {_literal(spec.suffix)} }}}}"


def _text_body(expression: str) -> str:
    """ " " + text, or moss-003's " None" when there is none."""
    return f"((' ' ~ {expression}) if {_is_set(expression)} else {_literal(fmt.NONE_BODY)})"


def _results_body(expression: str) -> str:
    """A list of result lines as moss-003's block ("\\n" + lines + "\\n"), a text as " " + text."""
    newline = _literal("\n")
    lines = f"({newline} ~ {expression} | join({newline}) ~ {newline})"
    return (
        f"(({_literal(fmt.NONE_BODY)} if not {expression} "
        f"else ((' ' ~ {expression}) if {expression} is string else {lines})) "
        f"if {_is_set(expression)} else {_literal(fmt.NONE_BODY)})"
    )


NO_CAPABILITIES = "this model was trained without capability lines: it takes no tools"
# The format's command and result layouts, cut at the argument / answer: Calculate("..."),
# ... => '...', ... =>\n...
COMMAND_OPEN, COMMAND_CLOSE = fmt.command("", "\0").split("\0")
ARROW, ARROW_END = fmt.result_line("", "", "\0", multiline=False)[len(fmt.command("", "")) :].split("\0")
MULTILINE_ARROW = fmt.result_line("", "", "\0", multiline=True)[len(fmt.command("", "")) :].split("\0")[0]


def _default_meta(chat: ChatFormat) -> str:
    """Jinja for the meta instruction the model was trained with, `ns.plugins` enabled."""
    quality = _literal(chat.tag_suffix)
    if not chat.capabilities:
        return (
            f"{{%- if ns.plugins -%}}{_raise(_literal(NO_CAPABILITIES))}{{%- endif -%}}"
            f"{{{{ {_literal(chat.preamble)} ~ {quality} }}}}"
        )
    thoughts_on, thoughts_off = (
        _literal(fmt.capability_line(fmt.INNER_THOUGHTS_CAPABILITY, state)) for state in (True, False)
    )
    lines = [
        f"{{{{ {_literal(chat.preamble + fmt.CAPABILITIES_HEADER)} ~ "
        f"({thoughts_on} if ns.plugins else {thoughts_off}) }}}}"
    ]
    for name, label, api in fmt.PLUGIN_CAPABILITIES:
        on, off = (_literal(fmt.capability_line(label, state, api)) for state in (True, False))
        lines.append(f"{{{{ {on} if {_literal(name)} in ns.plugins else {off} }}}}")
    return "".join(lines) + f"{{{{ {quality} }}}}"


_TOOLS = (
    "{%- for tool in (tools or []) -%}"
    "{%- set spec = tool['function'] if (tool is mapping and tool['function'] is defined) else tool -%}"
    "{%- set name = spec['name'] if spec is mapping else spec -%}"
    "{%- if name not in plugin_by_tool -%}"
    + _raise(_literal("unknown tool ") + " ~ name ~ " + _literal(f"; MOSS's tools: {', '.join(PLUGIN_BY_TOOL)}"))
    + "{%- endif -%}"
    "{%- set ns.plugins = ns.plugins + [plugin_by_tool[name]] -%}"
    "{%- endfor -%}"
)

# One tool call -> its command; appended to ns.calls (and its API to ns.apis).
_CALL = (
    "{%- set function = call['function'] if call['function'] is defined else call -%}"
    "{%- set arguments = function['arguments'] -%}"
    "{%- if arguments is not mapping or arguments | length != 1 -%}"
    + _raise(
        _literal('a MOSS tool call takes one argument, as a mapping ({"expression": "1+1"}); got ') + " ~ arguments"
    )
    + "{%- endif -%}"
    "{%- set api = api_by_plugin[function['name']] if function['name'] in api_by_plugin else function['name'] -%}"
    "{%- set ns.calls = ns.calls + [api ~ "
    + _literal(COMMAND_OPEN)
    + " ~ (arguments.values() | first) ~ "
    + _literal(COMMAND_CLOSE)
    + "] -%}"
    "{%- set ns.apis = ns.apis + [api] -%}"
)


def build_chat_template(chat: ChatFormat = ChatFormat()) -> str:
    """The template of a model trained as `chat` describes (see the module docstring)."""
    thoughts = (
        "{%- set thoughts = message['reasoning_content'] if "
        + _is_set("message['reasoning_content']")
        + " else message['inner_thoughts'] -%}"
    )
    tool_call_turn = (
        "{%- if not "
        + _is_set("thoughts")
        + " and message['content'] -%}{%- set thoughts = message['content'] -%}{%- endif -%}"
        "{%- set ns.calls = [] -%}{%- set ns.apis = [] -%}{%- set ns.answered = 0 -%}"
        "{%- for call in message['tool_calls'] -%}"
        + _CALL
        + "{%- endfor -%}"
        + _field(IT, _text_body("thoughts"))
        + _field(CMD, "(' ' ~ ns.calls | join(', '))")
        + "{%- set ns.stage = 'commands' -%}"
    )
    plain_turn = (
        _field(IT, _text_body("thoughts"))
        + _field(CMD, _text_body("message['commands']"))
        + _field(RES, _results_body("message['results']"))
        + _field(REPLY, "(' ' ~ message['content'])")
        + "{%- set ns.stage = 'closed' -%}"
    )
    newline = _literal("\n")
    tool_result = (
        "{%- if ns.stage == 'commands' -%}{{ " + _literal(RES.prefix) + " }}{%- set ns.stage = 'results' -%}"
        "{%- elif ns.stage != 'results' -%}"
        + _raise(_literal("a tool message answers the tool_calls of the assistant message before it"))
        + "{%- endif -%}"
        "{%- if ns.answered >= ns.calls | length -%}"
        + _raise(_literal("more tool messages than tool calls"))
        + "{%- endif -%}"
        "{%- set api = ns.apis[ns.answered] -%}"
        "{{ "
        + newline
        + " ~ ns.calls[ns.answered] ~ (("
        + _literal(MULTILINE_ARROW)
        + " ~ message['content']) if api in multiline_apis else ("
        + _literal(ARROW)
        + " ~ message['content'] ~ "
        + _literal(ARROW_END)
        + ")) }}"
        "{%- set ns.answered = ns.answered + 1 -%}"
        "{%- if loop.nextitem is not defined or loop.nextitem['role'] != 'tool' -%}"
        "{{ " + newline + " ~ " + _literal(RES.suffix) + " }}{%- set ns.stage = 'answered' -%}{%- endif -%}"
    )
    return (
        f"{{%- set plugin_by_tool = {_mapping(PLUGIN_BY_TOOL)} -%}}"
        f"{{%- set api_by_plugin = {_mapping(API_BY_PLUGIN)} -%}}"
        f"{{%- set multiline_apis = [{', '.join(_literal(a) for a in sorted(fmt.MULTILINE_RESULT_APIS))}] -%}}"
        "{%- set ns = namespace(stage='closed', plugins=[], calls=[], apis=[], answered=0) -%}"
        + _TOOLS
        + "{%- if messages and messages[0]['role'] == 'system' -%}"
        "{%- if ns.plugins -%}" + _raise(_literal(SYSTEM_WITH_TOOLS)) + "{%- endif -%}"
        "{{ messages[0]['content'] }}"
        "{%- else -%}" + _default_meta(chat) + "{%- endif -%}"
        "{%- for message in messages -%}"
        "{%- set role = message['role'] -%}"
        "{%- if role == 'system' -%}"
        "{%- if not loop.first -%}"
        + _raise(_literal("the system message (the meta instruction) must come first"))
        + "{%- endif -%}"
        "{%- elif role == 'user' -%}"
        "{%- if ns.stage != 'closed' -%}"
        + _raise(_literal("a user message must follow a complete assistant turn"))
        + "{%- endif -%}"
        + _field(HUMAN, "(' ' ~ message['content'])")
        + "{%- set ns.stage = 'human' -%}"
        "{%- elif role == 'assistant' -%}"
        "{%- if ns.stage == 'human' -%}"
        + thoughts
        + "{%- if message['tool_calls'] -%}"
        + tool_call_turn
        + "{%- else -%}"
        + plain_turn
        + "{%- endif -%}"
        "{%- elif ns.stage == 'answered' -%}"
        + _field(REPLY, "(' ' ~ message['content'])")
        + "{%- set ns.stage = 'closed' -%}"
        "{%- else -%}"
        + _raise(_literal("an assistant message follows a user message, or the tool messages of its tool calls"))
        + "{%- endif -%}"
        "{%- elif role == 'tool' -%}"
        + tool_result
        + "{%- else -%}"
        + _raise(_literal("MOSS messages have the roles system, user, assistant, tool; got ") + " ~ role")
        + "{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}"
        "{%- if ns.stage == 'human' -%}{{ " + _literal(IT.prefix) + " }}"
        "{%- elif ns.stage == 'answered' -%}{{ " + _literal(REPLY.prefix) + " }}"
        "{%- elif ns.stage != 'closed' -%}"
        + _raise(_literal("run the tool calls first: one tool message per call"))
        + "{%- endif -%}"
        "{%- endif -%}"
    )


SYSTEM_WITH_TOOLS = (
    "a system message is the whole meta instruction, capability lines included: leave it out to have "
    "`tools` enable their lines in the model's own meta instruction, or write them into it"
)


# ================================================================== the same in Python
def _thoughts(message: Mapping, tool_call: bool):
    thoughts = message.get("reasoning_content")
    thoughts = thoughts if thoughts is not None else message.get("inner_thoughts")
    if thoughts is None and tool_call and message.get("content"):
        thoughts = message["content"]
    return thoughts


def _call(call: Mapping) -> tuple[str, str]:
    """(api, argument) of one HF tool call."""
    function = call.get("function", call)
    arguments = function.get("arguments")
    if not isinstance(arguments, Mapping) or len(arguments) != 1:
        raise ChatTemplateError(
            f'a MOSS tool call takes one argument, as a mapping ({{"expression": "1+1"}}); got {arguments}'
        )
    return API_BY_PLUGIN.get(function["name"], function["name"]), str(next(iter(arguments.values())))


def _results_text_body(results) -> str:
    if not results:
        return fmt.NONE_BODY
    return " " + results if isinstance(results, str) else fmt.results_body(list(results))


def tool_plugins(tools) -> list[str]:
    """The plugins `tools` (HF schemas or names) enable, in their order."""
    plugins = []
    for tool in tools or []:
        spec = tool.get("function", tool) if isinstance(tool, Mapping) else tool
        name = spec["name"] if isinstance(spec, Mapping) else spec
        if name not in PLUGIN_BY_TOOL:
            raise ChatTemplateError(f"unknown tool {name}; MOSS's tools: {', '.join(PLUGIN_BY_TOOL)}")
        plugins.append(PLUGIN_BY_TOOL[name])
    return plugins


def message_segments(
    messages: Sequence[Mapping], tools=None, add_generation_prompt: bool = False, chat: ChatFormat = ChatFormat()
) -> list[fmt.Segment]:
    """The template's rendering as format segments (see the module docstring)."""
    plugins = tool_plugins(tools)
    if messages and messages[0]["role"] == ROLE_SYSTEM:
        if plugins:
            raise ChatTemplateError(SYSTEM_WITH_TOOLS)
        meta = messages[0]["content"]
    else:
        meta = chat.meta_instruction(plugins)
    segments = [fmt.Segment(meta, fmt.META, "meta")] if meta else []
    stage, turn, calls, answers = "closed", -1, [], []

    def field(role: str, body: str) -> None:
        segments.extend(fmt.field_segments(role, body, turn))

    for i, message in enumerate(messages):
        role = message["role"]
        if role == ROLE_SYSTEM:
            if i:
                raise ChatTemplateError("the system message (the meta instruction) must come first")
        elif role == ROLE_USER:
            if stage != "closed":
                raise ChatTemplateError("a user message must follow a complete assistant turn")
            turn += 1
            field(fmt.HUMAN, " " + message["content"])
            stage = "human"
        elif role == ROLE_ASSISTANT and stage == "human" and message.get("tool_calls"):
            calls, answers = [_call(call) for call in message["tool_calls"]], []
            field(fmt.INNER_THOUGHTS, fmt._body(_thoughts(message, tool_call=True)))
            field(fmt.COMMANDS, " " + ", ".join(fmt.command(api, argument) for api, argument in calls))
            stage = "commands"
        elif role == ROLE_ASSISTANT and stage == "human":
            field(fmt.INNER_THOUGHTS, fmt._body(_thoughts(message, tool_call=False)))
            field(fmt.COMMANDS, fmt._body(message.get("commands")))
            field(fmt.RESULTS, _results_text_body(message.get("results")))
            field(fmt.MOSS, " " + message["content"])
            stage = "closed"
        elif role == ROLE_ASSISTANT and stage == "answered":
            field(fmt.MOSS, " " + message["content"])
            stage = "closed"
        elif role == ROLE_ASSISTANT:
            raise ChatTemplateError(
                "an assistant message follows a user message, or the tool messages of its tool calls"
            )
        elif role == ROLE_TOOL:
            if stage not in ("commands", "results"):
                raise ChatTemplateError("a tool message answers the tool_calls of the assistant message before it")
            if len(answers) >= len(calls):
                raise ChatTemplateError("more tool messages than tool calls")
            api, argument = calls[len(answers)]
            answers.append(fmt.result_line(api, argument, message["content"]))
            stage = "results"
            if i + 1 == len(messages) or messages[i + 1]["role"] != ROLE_TOOL:
                field(fmt.RESULTS, fmt.results_body(answers))
                stage = "answered"
        else:
            raise ChatTemplateError(f"MOSS messages have the roles system, user, assistant, tool; got {role}")
    if add_generation_prompt:
        if stage == "human":
            segments.append(fmt.Segment(IT.prefix, fmt.INNER_THOUGHTS, "marker", turn))
        elif stage == "answered":
            segments.append(fmt.Segment(REPLY.prefix, fmt.MOSS, "marker", turn))
        elif stage != "closed":
            raise ChatTemplateError("run the tool calls first: one tool message per call")
    return segments


def render_messages(
    messages: Sequence[Mapping], tools=None, add_generation_prompt: bool = False, chat: ChatFormat = ChatFormat()
) -> str:
    """The MOSS text of messages, by the format module (what the template renders)."""
    return "".join(s.text for s in message_segments(messages, tools, add_generation_prompt, chat))


# ================================================================== dialogue -> messages
def _text(body: str) -> Optional[str]:
    """The text of a field body (" text" -> "text"; " None" -> None)."""
    if body == fmt.NONE_BODY:
        return None
    if not body.startswith(" "):
        raise ChatTemplateError(f"a field body without its leading space cannot be a message: {body[:40]!r}")
    return body[1:]


def _tool_messages(turn: fmt.Turn) -> Optional[list[dict]]:
    """The turn as an assistant message with tool_calls, one tool message per call and the
    reply, when that renders exactly as the turn does (else None)."""
    calls = fmt.parse_commands(turn.commands)
    block = turn.results
    if not calls or not (block.startswith("\n") and block.endswith("\n")):
        return None
    answers, rest = [], block[1:-1]
    for k, (api, argument) in enumerate(calls):  # each answer runs up to the next call's line
        multiline = api in fmt.MULTILINE_RESULT_APIS
        rest = rest.removeprefix(fmt.command(api, argument) + (" =>\n" if multiline else " => '"))
        following = "\n" + fmt.command(*calls[k + 1]) + " =>" if k + 1 < len(calls) else None
        end = rest.find(following) if following else len(rest)
        answer, rest = rest[: max(end, 0)], rest[max(end, 0) + 1 :]
        answers.append(answer if multiline else answer.removesuffix("'"))
    thoughts = _text(turn.inner_thoughts)
    messages = [
        {
            "role": ROLE_ASSISTANT,
            "content": None,
            **({} if thoughts is None else {"reasoning_content": thoughts}),
            "tool_calls": [
                {"type": "function", "function": {"name": api, "arguments": {_parameter(api): argument}}}
                for api, argument in calls
            ],
        },
        *({"role": ROLE_TOOL, "content": answer} for answer in answers),
        {"role": ROLE_ASSISTANT, "content": _text(turn.moss)},
    ]
    probe = [{"role": ROLE_SYSTEM, "content": ""}, {"role": ROLE_USER, "content": _text(turn.human)}, *messages]
    return messages if render_messages(probe) == fmt.render(fmt.Dialogue("", [turn])) else None


def _parameter(api: str) -> str:
    plugin = PLUGIN_BY_TOOL.get(api)
    return fmt.plugin_api(plugin)[1] if plugin else "argument"


def messages_from_dialogue(dialogue: fmt.Dialogue) -> list[dict]:
    """HF messages for a dialogue: tool turns as tool_calls + tool messages where that form
    renders them exactly, MOSS's own fields (``commands``, ``results``) where it cannot; the
    meta instruction as the system message."""
    messages = [{"role": ROLE_SYSTEM, "content": dialogue.meta_instruction}] if dialogue.meta_instruction else []
    for turn in dialogue.turns:
        messages.append({"role": ROLE_USER, "content": _text(turn.human)})
        messages.extend(_tool_messages(turn) or [_assistant_message(turn)])
    return messages


def _assistant_message(turn: fmt.Turn) -> dict:
    """The turn as one assistant message; MOSS's own fields where a field is not " None"."""
    message = {"role": ROLE_ASSISTANT, "content": _text(turn.moss)}
    if turn.inner_thoughts != fmt.NONE_BODY:
        message["reasoning_content"] = _text(turn.inner_thoughts)
    if turn.commands != fmt.NONE_BODY:
        message["commands"] = _text(turn.commands)
    block = turn.results
    if block != fmt.NONE_BODY:
        message["results"] = (
            block[1:-1].split("\n")
            if block.startswith("\n") and block.endswith("\n") and len(block) > 1
            else _text(block)
        )
    return message


def dialogue_from_messages(messages: Sequence[Mapping]) -> fmt.Dialogue:
    """The Dialogue complete messages describe (a trailing user message is left out)."""
    segments = message_segments(messages)
    meta = segments[0].text if segments and segments[0].role == fmt.META else ""
    turns: dict[int, dict] = {}
    for segment in segments:
        if segment.part == "body":
            turns.setdefault(segment.turn, {})[segment.role] = segment.text
    complete = [t for t in turns.values() if fmt.MOSS in t]
    return fmt.Dialogue(meta, [fmt.Turn(**{role: body for role, body in t.items()}) for t in complete])
