"""One chat turn for moss-serve, streamed: the two-pass protocol of chat/protocol.py, driven a
token at a time through the engine.

Pass one (inner thoughts, commands) and pass two (the reply) are the protocol's own steps
(``first_prompt``, ``after_first_pass`` — which runs the enabled plugins — and ``read_reply``);
this module only decides what of the text generated so far a client may be shown, and stops
early at a stop string. What it yields: :class:`Delta` (new text of a field, or the tool results
once they ran), then one :class:`Outcome` (the turn, why it ended, token counts).

``max_tokens`` bounds everything the model writes in the turn (both passes together, as the
API's ``completion_tokens`` counts it); pass two gets what pass one left, within the context.
Stop strings apply to the reply (the API's ``content``).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass

import torch

from moss_train import format as fmt
from moss_train.chat import protocol
from moss_train.chat.generate import Row, Sampling
from moss_train.chat.plugins import Plugin
from moss_train.serve.engine import Engine

# The fields a client is shown, by their name in the API's `moss` field (and `content`).
THOUGHTS, COMMANDS, RESULTS, CONTENT = "inner_thoughts", "commands", "results", "content"
_ROLE_OF = {THOUGHTS: fmt.INNER_THOUGHTS, COMMANDS: fmt.COMMANDS, CONTENT: fmt.MOSS}
_END_TOKENS = tuple(spec.end for spec in fmt.FIELDS)


@dataclass(frozen=True)
class Options:
    max_tokens: int
    sampling: Sampling = Sampling()
    seed: int = 0
    stop: tuple[str, ...] = ()


@dataclass
class Delta:
    field: str  # THOUGHTS, COMMANDS, CONTENT: text to append; RESULTS: the ToolCalls that ran
    value: object


@dataclass
class Outcome:
    result: protocol.TurnResult
    finish_reason: str  # "stop" (the reply ended, or a stop string) or "length"
    prompt_tokens: int
    completion_tokens: int


class _Shown:
    """What of each field has been shown. A field only grows; while it is still being written
    its last whitespace, a half-decoded character and a possible start of a stop string wait."""

    def __init__(self, stop: Sequence[str]):
        self.stop = [s for s in stop if s]
        self.sent: dict[str, str] = {}
        self.stopped = False  # a stop string appeared in the reply

    def cut(self, reply: str) -> str:
        """The reply up to the first stop string (and whether there was one, in self.stopped)."""
        hits = [reply.find(s) for s in self.stop if s in reply]
        if hits:
            self.stopped = True
            return reply[: min(hits)].rstrip()
        return reply

    def update(self, field: str, body: str | None, complete: bool) -> Delta | None:
        if body is None:
            return None
        if not complete:  # an end token ends what is shown of a field still being written
            body = body[: min((body.find(end) for end in _END_TOKENS if end in body), default=len(body))]
        text = body.strip() if complete else body.lstrip()
        if field == CONTENT:
            text = self.cut(text)
        if not complete and not self.stopped:
            text = self._settled(text, field == CONTENT)
        before = self.sent.get(field, "")
        if len(text) <= len(before) or not text.startswith(before):
            return None
        self.sent[field] = text
        return Delta(field, text[len(before) :])

    def _settled(self, text: str, is_reply: bool) -> str:
        text = text.rstrip().rstrip("\ufffd")
        if is_reply:  # the longest end of the reply that may begin a stop string waits
            held = max((n for s in self.stop for n in range(1, len(s)) if text.endswith(s[:n])), default=0)
            text = text[: len(text) - held]
        return text


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


async def stream_turn(
    engine: Engine, request: protocol.TurnRequest, plugins: Mapping[str, Plugin], options: Options
) -> AsyncIterator[Delta | Outcome]:
    """The turn's deltas as they are generated, then its Outcome. Hold an engine slot around it."""
    tokenizer = engine.tokenizer
    first_stops, reply_stops = protocol.stop_ids(tokenizer)
    shown = _Shown(options.stop)
    prompt = protocol.first_prompt(tokenizer, request)

    async def run(prompt_ids: list[int], budget: int, stops, fields: Sequence[str]) -> AsyncIterator[Delta | list[int]]:
        # Each pass samples from a generator seeded with the request's seed, as two_pass does.
        row = Row(prompt_ids, budget, frozenset(stops), options.sampling, _generator(options.seed))
        async with contextlib.aclosing(engine.tokens(row)) as tokens:
            count = 0
            async for _ in tokens:
                # The text as of this token: the engine thread may be tokens ahead of this task,
                # and a delta per token keeps the stream's pace the model's, not the scheduler's.
                count += 1
                text = tokenizer.decode(row.tokens[:count])
                for field in fields:
                    delta = shown.update(field, protocol.field_so_far(text, _ROLE_OF[field]), complete=False)
                    if delta:
                        yield delta
                if shown.stopped:
                    break
        yield row.tokens

    first: list[int] = []
    async with contextlib.aclosing(
        run(prompt, options.max_tokens, first_stops, (THOUGHTS, COMMANDS, CONTENT))
    ) as items:
        async for item in items:
            if isinstance(item, Delta):
                yield item
            else:
                first = item
    result, second_prompt = await asyncio.to_thread(
        protocol.after_first_pass, tokenizer, request, prompt, first, plugins
    )
    if result.tool_calls:
        yield Delta(RESULTS, result.tool_calls)
    second: list[int] = []
    budget = min(options.max_tokens - len(first), engine.context - len(second_prompt or ()))
    if second_prompt is not None and budget > 0 and not shown.stopped:
        async with contextlib.aclosing(run(second_prompt, budget, reply_stops, (CONTENT,))) as items:
            async for item in items:
                if isinstance(item, Delta):
                    yield item
                else:
                    second = item
        protocol.read_reply(tokenizer, result, second)
    if shown.stopped:  # the reply is what came before the stop string
        result.reply = shown.sent.get(CONTENT, "")
    for field, body in ((THOUGHTS, result.inner_thoughts), (COMMANDS, result.commands), (CONTENT, result.reply)):
        delta = shown.update(field, body, complete=True)  # what was held back while it was written
        if delta:
            yield delta
    finish = "stop" if result.finished or shown.stopped else "length"
    yield Outcome(result, finish, len(prompt), len(first) + len(second))
