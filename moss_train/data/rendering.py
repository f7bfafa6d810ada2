"""Conversations → token ids + one flag byte per token (stored in a token shard's ``.mask`` stream).

Flag bits (so one rendering serves every masking recipe and whole-turn truncation):

- ``LOSS_DEFAULT`` (1): what the model generates — inner thoughts, commands and the MOSS reply,
  each field whole (marker, text, end token and its newline); never the meta instruction, the
  human turns or the plugin results;
- ``LOSS_MOSS_REFERENCE`` (2): the original MOSS recipe — everything but the meta instruction and
  the *content* of the results (``<|Results|>:`` and ``<eor>\\n`` around it do carry loss);
- ``TURN_START`` (4): the first token of each turn.

A flag on token ``t`` means "token ``t`` is a target" (predicted from the tokens before it).
Rendering runs offline (``moss-data sft``, ``moss-data pairs``, stage=tag); the conversations
come from moss_train/data/parsing.py.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Sequence

import numpy as np

from moss_train import format as fmt
from moss_train.data.parsing import Conversation
from moss_train.losses import IGNORE_INDEX

LOSS_DEFAULT = 1
LOSS_MOSS_REFERENCE = 2
TURN_START = 4
LOSS_MASKS = {"default": LOSS_DEFAULT, "moss_reference": LOSS_MOSS_REFERENCE}


def segment_flags(segment: fmt.Segment) -> int:
    """The loss flags of every token of a segment (see the module docstring)."""
    flags = 0
    if segment.role in fmt.GENERATED_ROLES:
        flags |= LOSS_DEFAULT
    if segment.role != fmt.META and not (segment.role == fmt.RESULTS and segment.part == "body"):
        flags |= LOSS_MOSS_REFERENCE
    return flags


def render_many(tokenizer, conversations: Sequence[Conversation]) -> list[tuple[np.ndarray, np.ndarray]]:
    """(ids int64, flags uint8) per conversation; all segments encoded in one batch call."""
    per_conv = [fmt.dialogue_segments(c.dialogue) for c in conversations]
    encoded = fmt.encode_segments(tokenizer, [s for segments in per_conv for s in segments])
    out, k = [], 0
    for segments in per_conv:
        ids, flags = [], []
        for segment in segments:
            seg_ids = encoded[k]
            k += 1
            seg_flags = [segment_flags(segment)] * len(seg_ids)
            if segment.part == "marker" and segment.role == fmt.HUMAN and seg_flags:
                seg_flags[0] |= TURN_START
            ids.extend(seg_ids)
            flags.extend(seg_flags)
        out.append((np.asarray(ids, dtype=np.int64), np.asarray(flags, dtype=np.uint8)))
    return out


def render(tokenizer, conversation: Conversation) -> tuple[np.ndarray, np.ndarray]:
    return render_many(tokenizer, [conversation])[0]


def turns_within_chars(conversation: Conversation, max_chars: int) -> int:
    """How many leading turns, with the meta instruction, span at most `max_chars` characters.
    With max_chars = max_length x the most characters one token spans, no turn past them can
    end within max_length tokens: counting characters decides that without tokenizing."""
    total = len(conversation.dialogue.meta_instruction)
    for i, turn in enumerate(conversation.dialogue.turns):
        total += sum(len(segment.text) for segment in fmt.turn_segments(turn, i))
        if total > max_chars:
            return i
    return len(conversation.dialogue.turns)


def first_turns(conversation: Conversation, n: int) -> Conversation:
    return replace(
        conversation, dialogue=fmt.Dialogue(conversation.dialogue.meta_instruction, conversation.dialogue.turns[:n])
    )


def kept_length(flags: np.ndarray, max_length: int) -> int:
    """Tokens kept when cutting after the last whole turn that fits in `max_length`; 0 when
    not even the first turn (with the meta instruction) fits."""
    n = len(flags)
    if n <= max_length:
        return n
    starts = np.flatnonzero(np.asarray(flags) & TURN_START)
    turn_ends = np.append(starts[1:], n)
    fitting = turn_ends[turn_ends <= max_length]
    return int(fitting[-1]) if fitting.size else 0


def loss_spans(flags: np.ndarray, bit: int) -> list[tuple[int, int]]:
    """[start, stop) runs of tokens whose flags carry `bit`."""
    on = np.concatenate([[0], (np.asarray(flags) & bit) > 0, [0]]).astype(np.int8)
    edges = np.flatnonzero(np.diff(on))
    return list(zip(edges[0::2].tolist(), edges[1::2].tolist()))


def target_labels(ids: np.ndarray, flags: np.ndarray, bit: int) -> np.ndarray:
    """Next-token labels of one conversation: token t+1 where it carries the loss bit, else -100.
    The last token predicts nothing (the next conversation, or padding, follows it)."""
    labels = np.full(len(ids), IGNORE_INDEX, dtype=np.int64)
    labels[:-1] = np.where((flags[1:] & bit) > 0, ids[1:], IGNORE_INDEX)
    return labels
