"""Supervised fine-tuning data: dialogues → token ids + per-token loss flags → packed or padded batches.

Rendering (offline, in ``moss-data sft``): a record in one of three formats becomes a
:class:`Conversation` in the MOSS turn format (moss_train/format.py), then token ids and
one flag byte per token, stored in a token shard's ``.mask`` stream:

- ``moss003``  the moss-003 layout (``meta_instruction``, ``num_turns``, ``chat.turn_N`` with the
               five fields ``Human``, ``Inner Thoughts``, ``Commands``, ``Tool Responses``, ``MOSS``);
- ``messages`` OpenAI style ``{"messages": [{"role": "system"|"user"|"assistant", "content": ...}]}``;
- ``alpaca``   ``{"instruction", "input" (optional), "output"}``.

Flag bits (so one rendering serves every masking recipe and whole-turn truncation):

- ``LOSS_DEFAULT`` (1): what the model generates — inner thoughts, commands and the MOSS reply,
  each field whole (marker, text, end token and its newline); never the meta instruction, the
  human turns or the plugin results;
- ``LOSS_MOSS_REFERENCE`` (2): the original MOSS recipe — everything but the meta instruction and
  the *content* of the results (``<|Results|>:`` and ``<eor>\\n`` around it do carry loss);
- ``TURN_START`` (4): the first token of each turn.

A flag on token ``t`` means "token ``t`` is a target" (predicted from the tokens before it).

Training (``stage=sft``): conversations longer than ``data.seq_len`` are cut after the last
whole turn that fits (the original recipe's rule) or skipped, by ``sft.truncation``; one whose
first turn does not fit is skipped; both counted. Then either packed several per sequence with
document-isolated attention (positions restart, no attention or loss across conversations), or
one per row padded to the longest of its micro-batch, in a length-grouped or random order.
"""

from __future__ import annotations

import bisect
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any, Sequence

import numpy as np
import torch

from moss_train import format as fmt
from moss_train.data.packed import packed_row
from moss_train.losses import IGNORE_INDEX

LOSS_DEFAULT = 1
LOSS_MOSS_REFERENCE = 2
TURN_START = 4
LOSS_MASKS = {"default": LOSS_DEFAULT, "moss_reference": LOSS_MOSS_REFERENCE}
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


# ------------------------------------------------------------------------------ parsing
def detect_format(record: dict) -> str:
    if "chat" in record:
        return "moss003"
    if "messages" in record:
        return "messages"
    if "instruction" in record and "output" in record:
        return "alpaca"
    raise RecordError(UNKNOWN_FORMAT, f"no 'chat', 'messages' or 'instruction'+'output' key (keys: {sorted(record)[:8]})")


def parse_record(record: Any, format: str = "auto", meta_instruction: str | None = None, category_from: str = "plugins") -> Conversation:
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
        raise RecordError(MISSING_FIELD if chat is None else MALFORMED_FIELD, "chat must be an object of turn_1..turn_N")
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
        if not (text.startswith(spec.prefix) and text.endswith(spec.suffix) and len(text) >= len(spec.prefix) + len(spec.suffix)):
            raise RecordError(MALFORMED_FIELD, f"{key}.{spec.key} must be {spec.prefix!r} ... {spec.suffix!r}, got {text[:40]!r}...{text[-12:]!r}")
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


# ----------------------------------------------------------------------------- rendering
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
    return replace(conversation, dialogue=fmt.Dialogue(conversation.dialogue.meta_instruction, conversation.dialogue.turns[:n]))


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


# ------------------------------------------------------------------ training-time datasets
@dataclass
class LengthReport:
    """What fitting the conversations into seq_len did (printed and saved by the sft stage)."""

    conversations: int = 0
    kept: int = 0
    truncated: int = 0
    turns_dropped: int = 0
    skipped: Counter = field(default_factory=Counter)

    def as_dict(self) -> dict:
        return {
            "conversations": self.conversations,
            "kept": self.kept,
            "truncated": self.truncated,
            "turns_dropped": self.turns_dropped,
            "skipped": dict(self.skipped),
        }


class SFTConversations:
    """The conversations of mask-carrying shards, fitted to `max_length` tokens.

    Holds, per kept conversation: its shard, document index, kept length and category id.
    Each shard's `source` is its category (moss-data sft writes one shard per category).
    """

    def __init__(self, shards: Sequence, max_length: int, truncation: str = "turns", categories: Sequence[str] | None = None):
        if truncation not in ("turns", "skip"):
            raise ValueError(f"truncation must be 'turns' or 'skip', got {truncation!r}")
        self.shards = list(shards)
        # Category names; category_ids index this list (pass one list to share ids across datasets).
        self.categories = list(categories) if categories is not None else sorted({s.source for s in self.shards})
        self.report = LengthReport()
        columns = []
        for k, shard in enumerate(self.shards):
            kept = np.diff(shard.doc_offsets)
            self.report.conversations += len(kept)
            for i in np.flatnonzero(kept > max_length):
                kept[i] = self._fit_long(shard, int(i), max_length, truncation)
            docs = np.flatnonzero(kept > 0)
            category = self.categories.index(shard.source)
            columns.append(np.stack([np.full(len(docs), k), docs, kept[docs], np.full(len(docs), category)]))
        table = np.concatenate(columns, axis=1) if columns else np.zeros((4, 0), dtype=np.int64)
        self.shard_index, self.doc_index, self.lengths, self.category_ids = table.astype(np.int64)
        self.report.kept = len(self.lengths)

    def _fit_long(self, shard, i: int, max_length: int, truncation: str) -> int:
        flags = shard.document_mask(i)
        kept = kept_length(flags, max_length) if truncation == "turns" else 0
        if kept == 0:
            self.report.skipped[FIRST_TURN_TOO_LONG if truncation == "turns" else TOO_LONG] += 1
            return 0
        self.report.truncated += 1
        self.report.turns_dropped += int(np.count_nonzero(np.asarray(flags[kept:]) & TURN_START))
        return kept

    def __len__(self) -> int:
        return len(self.lengths)

    def tokens(self, j: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids, flags) of kept conversation `j`, cut to its kept length."""
        shard = self.shards[self.shard_index[j]]
        i, n = int(self.doc_index[j]), int(self.lengths[j])
        return np.asarray(shard.document(i)[:n], dtype=np.int64), np.asarray(shard.document_mask(i)[:n])


def _targets(ids: np.ndarray, flags: np.ndarray, bit: int) -> np.ndarray:
    """Next-token labels of one conversation: token t+1 where it carries the loss bit, else -100.
    The last token predicts nothing (the next conversation, or padding, follows it)."""
    labels = np.full(len(ids), IGNORE_INDEX, dtype=np.int64)
    labels[:-1] = np.where((flags[1:] & bit) > 0, ids[1:], IGNORE_INDEX)
    return labels


def pack_best_fit(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Best-fit decreasing: each item, longest first, goes to the fullest bin it still fits.

    Deterministic (ties by index); near-optimal fill for the length mixes of dialogue data.
    """
    order = sorted(range(len(lengths)), key=lambda j: (-int(lengths[j]), j))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (free space, bin id), sorted
    for j in order:
        need = int(lengths[j])
        if need > capacity:
            raise ValueError(f"item {j} of length {need} exceeds the bin capacity {capacity}")
        at = bisect.bisect_left(free, (need, -1))
        if at < len(free):
            space, b = free.pop(at)
        else:
            space, b = capacity, len(bins)
            bins.append([])
        bins[b].append(j)
        if space - need > 0:
            bisect.insort(free, (space - need, b))
    return bins


class PackedSFTDataset(torch.utils.data.Dataset):
    """Sequences of exactly `seq_len` tokens, each holding whole conversations (best-fit packed),
    then padding. ``segment_ids`` keep attention inside each conversation, ``position_ids``
    restart at each, and no label crosses a boundary. Bins are in a seeded order, so the first
    N samples (what evaluation reads) mix lengths and categories."""

    def __init__(self, conversations: SFTConversations, seq_len: int, loss_bit: int, pad_id: int, seed: int = 0):
        self.conversations = conversations
        self.seq_len = seq_len
        self.loss_bit = loss_bit
        self.pad_id = pad_id
        bins = pack_best_fit(conversations.lengths, seq_len)
        order = np.random.default_rng(seed).permutation(len(bins))
        self.bins = [bins[b] for b in order]

    def __len__(self) -> int:
        return len(self.bins)

    def __getitem__(self, b: int) -> dict[str, torch.Tensor]:
        pieces = []
        for j in self.bins[b]:
            ids, flags = self.conversations.tokens(j)
            pieces.append((ids, _targets(ids, flags, self.loss_bit), self.conversations.category_ids[j]))
        return packed_row(pieces, self.seq_len, self.pad_id, "category_ids")


class PaddedSFTDataset(torch.utils.data.Dataset):
    """One conversation per sample, padded to the longest of its micro-batch by
    :func:`collate_padded` (plain causal attention: right padding is never attended).

    ``order="length_grouped"``: the sample order is fixed here (the trainer must not shuffle it):
    a seeded permutation cut into mega-batches of `group_batches` global batches, each sorted by
    length, so a micro-batch holds similar lengths; then the global batches are shuffled.
    ``order="random"``: the dataset order is the document order and the trainer shuffles it (the
    original MOSS recipe: random batches padded to the longest).
    """

    def __init__(
        self,
        conversations: SFTConversations,
        loss_bit: int,
        pad_id: int,
        order: str = "length_grouped",
        global_batch_size: int = 1,
        seed: int = 0,
        group_batches: int = 16,
    ):
        self.conversations = conversations
        self.loss_bit = loss_bit
        self.pad_id = pad_id
        n = len(conversations)
        if order == "length_grouped":
            self.order = length_grouped_order(conversations.lengths, global_batch_size, seed, group_batches)
        elif order == "random":
            self.order = np.arange(n)
        else:
            raise ValueError(f"order must be 'length_grouped' or 'random', got {order!r}")

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        j = int(self.order[i])
        ids, flags = self.conversations.tokens(j)
        return {
            "input_ids": torch.from_numpy(ids),
            "labels": torch.from_numpy(_targets(ids, flags, self.loss_bit)),
            "category_ids": torch.full((len(ids),), int(self.conversations.category_ids[j]), dtype=torch.int64),
        }


def length_grouped_order(lengths: np.ndarray, global_batch_size: int, seed: int, group_batches: int = 16) -> np.ndarray:
    """A sample order whose global batches hold similar lengths, in a seeded random order."""
    rng = np.random.default_rng([seed, 1])
    order = rng.permutation(len(lengths))
    mega = max(1, global_batch_size * group_batches)
    for start in range(0, len(order), mega):
        chunk = order[start : start + mega]
        order[start : start + mega] = chunk[np.argsort(-lengths[chunk], kind="stable")]
    full = len(order) // global_batch_size * global_batch_size
    batches = order[:full].reshape(-1, global_batch_size)[rng.permutation(full // global_batch_size)]
    return np.concatenate([batches.reshape(-1), order[full:]])


def collate_padded(samples: Sequence[dict[str, torch.Tensor]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a micro-batch to its longest sample: ids with `pad_id`, labels with -100."""
    longest = max(len(s["input_ids"]) for s in samples)
    fill = {"input_ids": pad_id, "labels": IGNORE_INDEX, "category_ids": -1}
    out = {key: torch.full((len(samples), longest), value, dtype=torch.int64) for key, value in fill.items()}
    for row, sample in enumerate(samples):
        n = len(sample["input_ids"])
        for key in fill:
            out[key][row, :n] = sample[key]
    out["position_ids"] = torch.arange(longest).expand(len(samples), longest).clone()
    return out
