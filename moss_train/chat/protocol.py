"""The two-pass MOSS tool protocol (moss-003's inference loop), batched.

Pass one: the model is given the dialogue so far and the new ``<|Human|>`` field
(:func:`format.prompt_segments`) and writes ``<|Inner Thoughts|>: ...<eot>\\n<|Commands|>:
...<eoc>``; generation stops at ``<eoc>`` (or at ``<eom>``, should it answer at once). The
commands are parsed and run by the enabled plugins; their result lines go into the
``<|Results|>`` field exactly as SFT renders it (:func:`format.results_segments`, also
`` None`` when no command ran). Pass two continues from there and writes ``<|MOSS|>:
reply<eom>``. Every prompt is built segment by segment (:func:`format.encode_segments`), the
tokenization training saw.

Which plugins a conversation may use is what its meta instruction enables
(:func:`format.enabled_plugins`), answered by the plugin objects given; a command that no
enabled plugin answers gets ``No result.``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from moss_train import format as fmt
from moss_train.chat.generate import generate_batch
from moss_train.chat.plugins import BUILTIN, Plugin, ToolCall, build_plugins, call_tools


@dataclass(frozen=True)
class Settings:
    """Generation settings of both passes (HF generate's meaning; temperature 0 = greedy)."""

    max_new_tokens: int = 256  # per pass
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int = 0

    def generate(self, model, tokenizer, prompts, max_new_tokens, stop_ids) -> list[list[int]]:
        return generate_batch(
            model,
            prompts,
            max_new_tokens,
            stop_ids,
            tokenizer.pad_id,
            self.temperature,
            self.top_k,
            self.seed,
            top_p=self.top_p,
            repetition_penalty=self.repetition_penalty,
            vocab_size=tokenizer.vocab_size,
        )


@dataclass
class TurnRequest:
    meta: str
    history: Sequence[fmt.Turn]
    human: str


@dataclass
class TurnResult:
    """One turn as the model wrote it (field bodies keep their leading space, as in fmt.Turn)."""

    human: str
    inner_thoughts: str = fmt.NONE_BODY
    commands: str = fmt.NONE_BODY
    tool_calls: list[ToolCall] = field(default_factory=list)
    reply: str = ""  # the reply text (no leading space)
    finished: bool = False  # the reply ended with <eom> (not cut by max_new_tokens)

    @property
    def results(self) -> list[str]:
        return [call.line for call in self.tool_calls]

    def turn(self) -> fmt.Turn:
        """The turn for the history of the next one (rendered as SFT renders turns)."""
        return fmt.Turn(
            human=" " + self.human,
            inner_thoughts=self.inner_thoughts,
            commands=self.commands,
            results=fmt.results_body(self.results),
            moss=" " + self.reply,
        )


def encode(tokenizer, segments) -> list[int]:
    return [i for ids in fmt.encode_segments(tokenizer, segments) for i in ids]


def field_so_far(text: str, role: str) -> str | None:
    """The `role` field's body in generated text; if its end token has not come (yet, or ever:
    cut off), what follows its marker; None without the marker."""
    body = fmt.field_body(text, role)
    if body is not None:
        return body
    prefix = fmt.FIELD_BY_ROLE[role].prefix
    return text.split(prefix, 1)[1] if prefix in text else None


# The steps of one turn, for a driver that generates each pass: two_pass below (a batch of
# turns, one generate call per pass) and moss-serve (each turn streamed, continuously batched).
def stop_ids(tokenizer) -> tuple[tuple[int, int], tuple[int]]:
    """The stop ids of pass one (<eoc>, <eom>) and of pass two (<eom>)."""
    end_commands, end_reply = (tokenizer.token_to_id(t) for t in (fmt.END_OF_COMMANDS, fmt.END_OF_REPLY))
    return (end_commands, end_reply), (end_reply,)


def first_prompt(tokenizer, request: TurnRequest) -> list[int]:
    """Pass one's prompt: the dialogue so far and the new human field."""
    return encode(tokenizer, fmt.prompt_segments(request.meta, request.history, request.human))


def after_first_pass(
    tokenizer, request: TurnRequest, prompt: list[int], ids: list[int], plugins: Mapping[str, Plugin]
) -> tuple[TurnResult, list[int] | None]:
    """The turn as pass one (`ids`) left it, and pass two's prompt: None when the model answered
    at once or pass one was cut off by max_new_tokens (then the turn has no reply). The enabled
    plugins run the commands here."""
    (end_commands, end_reply), _ = stop_ids(tokenizer)
    text = tokenizer.decode(ids)
    result = TurnResult(request.human, field_so_far(text, fmt.INNER_THOUGHTS) or fmt.NONE_BODY)
    if ids and ids[-1] == end_reply:  # answered in pass one: no tools
        result.commands = fmt.field_body(text, fmt.COMMANDS) or fmt.NONE_BODY
        result.reply, result.finished = (field_so_far(text, fmt.MOSS) or "").strip(), True
    elif ids and ids[-1] == end_commands:
        result.commands = fmt.field_body(text, fmt.COMMANDS) or fmt.NONE_BODY
        enabled = {name: plugins[name] for name in fmt.enabled_plugins(request.meta) if name in plugins}
        result.tool_calls = call_tools(result.commands, enabled)
        results = fmt.results_segments(result.results, len(request.history))
        return result, prompt + list(ids) + encode(tokenizer, results)
    return result, None


def read_reply(tokenizer, result: TurnResult, ids: list[int]) -> None:
    """Pass two's output (`ids`) into the turn: the reply, and whether it ended with <eom>."""
    text = tokenizer.decode(ids)
    reply = field_so_far(text, fmt.MOSS)
    result.reply = (text if reply is None else reply).strip()
    result.finished = bool(ids) and ids[-1] == stop_ids(tokenizer)[1][0]


def two_pass(
    model,
    tokenizer,
    requests: Sequence[TurnRequest],
    plugins: Mapping[str, Plugin],
    settings: Settings = Settings(),
    max_new_tokens: tuple[int, int] | None = None,
) -> list[TurnResult]:
    """One turn of each conversation in `requests`, all generated as one batch per pass.

    plugins: by name; each conversation uses those its meta instruction enables.
    max_new_tokens: (pass one, pass two); default settings.max_new_tokens for both.
    """
    first_max, second_max = max_new_tokens or (settings.max_new_tokens, settings.max_new_tokens)
    first_stops, second_stops = stop_ids(tokenizer)
    prompts = [first_prompt(tokenizer, r) for r in requests]
    first = settings.generate(model, tokenizer, prompts, first_max, first_stops)
    results, second = [], []
    for i, (request, prompt, ids) in enumerate(zip(requests, prompts, first)):
        result, second_prompt = after_first_pass(tokenizer, request, prompt, ids, plugins)
        results.append(result)
        if second_prompt is not None:
            second.append((i, second_prompt))
    if second:
        replies = settings.generate(model, tokenizer, [p for _, p in second], second_max, second_stops)
        for (i, _), ids in zip(second, replies):
            read_reply(tokenizer, results[i], ids)
    return results


class ChatSession:
    """A conversation: meta instruction, history, the plugins it enables, one turn per ask()."""

    def __init__(
        self,
        model,
        tokenizer,
        plugins: Mapping[str, Plugin] | None = None,
        settings: Settings = Settings(),
        meta: str | None = None,
        preamble: str = fmt.MOSS_PREAMBLE,
        quality: tuple[int, int] | None = None,
        quality_template: str = fmt.QUALITY_TEMPLATE,
    ):
        """plugins: by name (default: none); meta: the whole meta instruction (default: the
        preamble + capability lines of `plugins`); quality: (level, levels) for a
        tag-conditioned model, rendered by format.with_quality in the model's training form."""
        self.model, self.tokenizer, self.settings = model, tokenizer, settings
        self.plugins = dict(plugins or {})
        meta = fmt.meta_instruction(self.plugins, preamble=preamble) if meta is None else meta
        self.meta = fmt.with_quality(meta, *quality, template=quality_template) if quality else meta
        self.history: list[fmt.Turn] = []

    def ask(self, human: str) -> TurnResult:
        """The model's turn for `human`; the turn joins the history. The oldest turns are left
        out of the prompt when it would not leave room for the reply within n_positions."""
        self._fit(human)
        result = two_pass(
            self.model, self.tokenizer, [TurnRequest(self.meta, self.history, human)], self.plugins, self.settings
        )[0]
        self.history.append(result.turn())
        return result

    def _fit(self, human: str) -> None:
        limit = self.model.config.n_positions - 2 * self.settings.max_new_tokens  # room for both passes
        while self.history and len(encode(self.tokenizer, fmt.prompt_segments(self.meta, self.history, human))) > limit:
            self.history.pop(0)

    def reset(self) -> None:
        self.history.clear()


def builtin_plugins() -> dict[str, Plugin]:
    """The plugins that need no configuration (calculator, equation solver)."""
    return build_plugins(BUILTIN)
