"""Preference pairs: records in the common formats → response groups → token ids → pair batches.

A record compares responses to one prompt (the last human turn of a conversation):

- ``{"prompt": str, "chosen": str, "rejected": str}`` (+ optional ``system`` / ``meta_instruction``,
  ``margin``);
- message lists: ``{"chosen": [messages], "rejected": [messages]}`` (whole conversations that
  differ only in the last assistant message), or ``{"prompt": [messages], "chosen": str | [messages],
  "rejected": ...}``;
- HH-RLHF text: ``{"chosen": "\\n\\nHuman: … \\n\\nAssistant: …", "rejected": "…"}``;
- ranked lists: ``{"prompt": ..., "responses": [r_1, ..., r_K]}`` best first, or with
  ``"scores": [s_1, ..., s_K]`` (higher is better; equal scores make no pair) — expanded to every
  ordered pair, with the score difference as the pair's margin.

A response is a string (the MOSS reply) or a dict of turn fields (``inner_thoughts``,
``commands``, ``results`` as a list of result lines, ``moss``) for tool-using turns.

Rendering uses the SFT renderer (moss_train/data/rendering.py), so a response's tokens, loss flags and
turn starts are exactly those of an SFT conversation: a DPO log-probability sums over the
tokens the model generates in the last turn; a reward is read at the last token.

On disk (``moss-data pairs``): each response is one document of a mask-carrying shard (THE
shard format), and ``{prefix}.pairs.npy`` holds one row per pair: chosen document, rejected
document, margin. A ranked list of K responses stores K documents for its K(K-1)/2 pairs.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from moss_train import format as fmt
from moss_train.data import parsing, rendering
from moss_train.data.shards import open_shards
from moss_train.data.token_datasets import resolve_shard_prefixes
from moss_train.errors import ConfigError
from moss_train.losses import IGNORE_INDEX

PAIRS_SUFFIX = ".pairs.npy"

# Reasons a pair record is rejected (besides parsing.RecordError's reasons for the conversation).
NO_RESPONSES = "no_responses"
IDENTICAL_RESPONSES = "identical_responses"
CONTEXTS_DIFFER = "contexts_differ"
BAD_SCORES = "bad_scores"
NO_PAIR = "no_pair"  # every response scored the same


@dataclass
class PairGroup:
    """Responses to one prompt, each as a whole conversation, and which beats which."""

    conversations: list[parsing.Conversation]  # the same context; the last turn differs
    pairs: list[tuple[int, int, float]]  # (better, worse, margin), indices into conversations
    id: Any = None


# ------------------------------------------------------------------------------- parsing
def parse_pair_record(record: Any, meta_instruction: str | None = None) -> PairGroup:
    """One input record as a PairGroup, or parsing.RecordError naming why not."""
    if not isinstance(record, dict):
        raise parsing.RecordError(parsing.NOT_AN_OBJECT, f"a record must be a JSON object, got {type(record).__name__}")
    if "responses" in record:
        context, responses = _context(record), record["responses"]
        if not isinstance(responses, list) or len(responses) < 2:
            raise parsing.RecordError(NO_RESPONSES, "responses must be a list of at least 2")
        pairs = _ranked_pairs(record.get("scores"), len(responses))
    elif "chosen" in record and "rejected" in record:
        context, responses = _pairwise(record)
        margin = record.get("margin", 0.0)
        if isinstance(margin, bool) or not isinstance(margin, (int, float)):
            raise parsing.RecordError(BAD_SCORES, f"margin must be a number, got {margin!r}")
        pairs = [(0, 1, float(margin))]
    else:
        raise parsing.RecordError(
            parsing.UNKNOWN_FORMAT, f"no 'chosen'+'rejected' or 'responses' key (keys: {sorted(record)[:8]})"
        )
    conversations = [_conversation(record, context, r, meta_instruction) for r in responses]
    if any(fmt.render(conversations[a].dialogue) == fmt.render(conversations[b].dialogue) for a, b, _ in pairs):
        raise parsing.RecordError(IDENTICAL_RESPONSES, "a pair compares a response with itself")
    return PairGroup(conversations, pairs, record.get("id", record.get("conversation_id")))


def _ranked_pairs(scores: Any, k: int) -> list[tuple[int, int, float]]:
    if scores is None:  # best first
        return [(a, b, float(b - a)) for a in range(k) for b in range(a + 1, k)]
    if (
        not isinstance(scores, list)
        or len(scores) != k
        or not all(isinstance(s, (int, float)) and not isinstance(s, bool) for s in scores)
    ):
        raise parsing.RecordError(BAD_SCORES, f"scores must be {k} numbers, one per response")
    pairs = [(a, b, float(scores[a] - scores[b])) for a in range(k) for b in range(k) if scores[a] > scores[b]]
    if not pairs:
        raise parsing.RecordError(NO_PAIR, "every response has the same score")
    return pairs


_HH_TURN = re.compile(r"\n\n(Human|Assistant):")


def hh_messages(text: str) -> list[dict]:
    """HH-RLHF text ("\\n\\nHuman: … \\n\\nAssistant: …") as a message list."""
    parts = _HH_TURN.split(text)
    if parts[0].strip() or len(parts) < 3:
        raise parsing.RecordError(parsing.MALFORMED_FIELD, f"HH text must start with '\\n\\nHuman:', got {text[:40]!r}")
    roles = {"Human": "user", "Assistant": "assistant"}
    return [{"role": roles[parts[i]], "content": parts[i + 1].strip()} for i in range(1, len(parts), 2)]


def _messages(value: Any, where: str) -> list[dict]:
    if isinstance(value, str):
        return hh_messages(value) if value.startswith("\n\nHuman:") else [{"role": "assistant", "content": value}]
    if isinstance(value, list):
        return value
    raise parsing.RecordError(
        parsing.MALFORMED_FIELD, f"{where} must be a string or a message list, got {type(value).__name__}"
    )


def _context(record: dict) -> list:
    """The conversation before the compared response: messages ending with the user's."""
    prompt = record.get("prompt")
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if isinstance(prompt, list) and prompt:
        return prompt
    raise parsing.RecordError(parsing.MISSING_FIELD, "prompt must be a string or a non-empty message list")


def _pairwise(record: dict) -> tuple[list, list]:
    """(context, [chosen, rejected]) from strings, message lists or HH text."""
    if "prompt" in record:
        chosen, rejected = (_messages(record[k], k) for k in ("chosen", "rejected"))
        if all(len(m) == 1 and isinstance(m[0], dict) for m in (chosen, rejected)):
            return _context(record), [_response(chosen[0]), _response(rejected[0])]
        return _split_common(_context(record) + chosen, _context(record) + rejected)
    chosen, rejected = (_messages(record[k], k) for k in ("chosen", "rejected"))
    return _split_common(chosen, rejected)


def _split_common(chosen: list, rejected: list) -> tuple[list, list]:
    """Two whole conversations → their shared context and their last assistant messages."""
    if not chosen or not rejected or chosen[:-1] != rejected[:-1]:
        raise parsing.RecordError(CONTEXTS_DIFFER, "chosen and rejected must share every message but the last")
    return chosen[:-1], [_response(chosen[-1]), _response(rejected[-1])]


def _response(message: Any) -> Any:
    """A message dict's content (assistant messages only), else the response as given."""
    if isinstance(message, dict) and "role" in message:
        if message["role"] != "assistant":
            raise parsing.RecordError(
                parsing.WRONG_ROLE_ORDER, f"the compared message must be the assistant's, got {message['role']!r}"
            )
        return message.get("content")
    return message


def _conversation(record: dict, context: list, response: Any, meta_override: str | None) -> parsing.Conversation:
    """The context plus one response, through the SFT parser (role order, types, meta)."""
    system = record.get("meta_instruction", record.get("system"))
    head = [{"role": "system", "content": system}] if isinstance(system, str) else []
    if isinstance(response, dict):  # a tool-using turn: parse the context with a placeholder reply
        base = parsing.parse_record(
            {"messages": head + context + [{"role": "assistant", "content": ""}]}, "messages", meta_override
        )
        last = base.dialogue.turns[-1]
        base.dialogue.turns[-1] = _tool_turn(last.human, response)
        return base
    if not isinstance(response, str):
        raise parsing.RecordError(
            parsing.NON_STRING_CONTENT, f"a response is {type(response).__name__}, not a string or a turn"
        )
    return parsing.parse_record(
        {"messages": head + context + [{"role": "assistant", "content": response}]}, "messages", meta_override
    )


def _tool_turn(human_body: str, fields: dict) -> fmt.Turn:
    def text(key):
        value = fields.get(key)
        if value is not None and not isinstance(value, str):
            raise parsing.RecordError(parsing.NON_STRING_CONTENT, f"response field {key} is {type(value).__name__}")
        return value

    results = fields.get("results")
    if results is not None and not (isinstance(results, list) and all(isinstance(r, str) for r in results)):
        raise parsing.RecordError(parsing.MALFORMED_FIELD, "response field results must be a list of result lines")
    if text("moss") is None:
        raise parsing.RecordError(parsing.MISSING_FIELD, "a tool-use response needs its moss reply")
    turn = fmt.Turn.from_text(
        human="", moss=text("moss"), inner_thoughts=text("inner_thoughts"), commands=text("commands"), results=results
    )
    turn.human = human_body
    return turn


# ----------------------------------------------------------------------------- rendering
def render_groups(tokenizer, groups: Sequence[PairGroup]) -> list[list[tuple[np.ndarray, np.ndarray]]]:
    """(ids, flags) per response of each group, in one tokenizer batch."""
    flat = rendering.render_many(tokenizer, [c for g in groups for c in g.conversations])
    out, k = [], 0
    for group in groups:
        out.append(flat[k : k + len(group.conversations)])
        k += len(group.conversations)
    return out


def response_labels(ids: np.ndarray, flags: np.ndarray) -> np.ndarray:
    """Next-token labels on what the model generates in the LAST turn (-100 elsewhere): the
    tokens whose log-probability a DPO response score sums."""
    labels = rendering.target_labels(ids, flags, rendering.LOSS_DEFAULT)
    starts = np.flatnonzero(flags & rendering.TURN_START)
    last_turn = int(starts[-1]) if starts.size else 0
    labels[: max(0, last_turn - 1)] = IGNORE_INDEX
    return labels


def turn_ends(flags: np.ndarray) -> list[int]:
    """The last token of each turn: where a reward model scores each assistant response."""
    starts = np.flatnonzero(np.asarray(flags) & rendering.TURN_START)
    return [int(s) - 1 for s in starts[1:]] + [len(flags) - 1]


# ------------------------------------------------------------------ training-time datasets
def pairs_path(prefix: str) -> Path:
    return Path(prefix + PAIRS_SUFFIX)


@dataclass
class PairReport:
    pairs: int = 0
    kept: int = 0
    skipped: Counter = field(default_factory=Counter)

    def as_dict(self) -> dict:
        return {"pairs": self.pairs, "kept": self.kept, "skipped": dict(self.skipped)}


class PairDataset(torch.utils.data.Dataset):
    """The pairs of pair shards whose two responses fit in `max_length` tokens (others counted).

    An item holds both responses' ids and DPO labels, the pair's margin, and — once
    :meth:`set_reference` ran — the reference model's log-probabilities of both.
    """

    def __init__(self, shards: Sequence, max_length: int):
        self.shards = list(shards)
        self.report = PairReport()
        rows = []
        for k, shard in enumerate(self.shards):
            index = np.load(pairs_path(shard.prefix), allow_pickle=False)
            if index.ndim != 2 or index.shape[1] != 3:
                raise ValueError(f"{pairs_path(shard.prefix)}: expected (pairs, 3) rows of chosen, rejected, margin")
            lengths = np.diff(shard.doc_offsets)
            docs = index[:, :2].astype(np.int64)
            fits = (lengths[docs] <= max_length).all(axis=1)
            self.report.pairs += len(index)
            self.report.skipped["too_long"] += int((~fits).sum())
            rows.append(np.column_stack([np.full(int(fits.sum()), k), index[fits]]))
        table = np.concatenate(rows) if rows else np.zeros((0, 4))
        self.shard_index = table[:, 0].astype(np.int64)
        self.docs = table[:, 1:3].astype(np.int64)
        self.margins = table[:, 3].astype(np.float32)
        self.report.kept = len(table)
        self.reference: np.ndarray | None = None  # (pairs, 2): reference log-probs of chosen, rejected
        lengths = [np.diff(s.doc_offsets) for s in self.shards]
        self.mean_length = (
            float(np.mean([lengths[s][d] for s, row in zip(self.shard_index, self.docs) for d in row]))
            if len(table)
            else 0.0
        )

    def __len__(self) -> int:
        return len(self.docs)

    def _response(self, i: int, which: int) -> tuple[torch.Tensor, torch.Tensor]:
        shard = self.shards[self.shard_index[i]]
        doc = int(self.docs[i, which])
        ids = np.asarray(shard.document(doc), dtype=np.int64)
        flags = np.asarray(shard.document_mask(doc))
        return torch.from_numpy(ids), torch.from_numpy(response_labels(ids, flags))

    def __getitem__(self, i: int) -> dict:
        (chosen, chosen_labels), (rejected, rejected_labels) = self._response(i, 0), self._response(i, 1)
        item = {
            "chosen": chosen,
            "chosen_labels": chosen_labels,
            "rejected": rejected,
            "rejected_labels": rejected_labels,
            "margin": torch.tensor(self.margins[i]),
        }
        if self.reference is not None:
            item["reference"] = torch.from_numpy(self.reference[i])
        return item

    def set_reference(self, logps: np.ndarray) -> None:
        if logps.shape != (len(self), 2):
            raise ValueError(f"reference log-probs must be ({len(self)}, 2), got {logps.shape}")
        self.reference = logps.astype(np.float64)


def collate_pairs(items: Sequence[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """B pairs → 2B right-padded rows: the chosen responses first, then the rejected ones.

    ``read_positions`` is each row's last real token (where a reward is read); ``labels`` mark
    the last turn's generated tokens (what a DPO log-probability sums).
    """
    rows = [it["chosen"] for it in items] + [it["rejected"] for it in items]
    labels = [it["chosen_labels"] for it in items] + [it["rejected_labels"] for it in items]
    longest = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), longest), pad_id, dtype=torch.int64)
    label_rows = torch.full((len(rows), longest), IGNORE_INDEX, dtype=torch.int64)
    for r, (ids, lab) in enumerate(zip(rows, labels)):
        input_ids[r, : len(ids)] = ids
        label_rows[r, : len(lab)] = lab
    batch = {
        "input_ids": input_ids,
        "labels": label_rows,
        "position_ids": torch.arange(longest).expand(len(rows), longest).clone(),
        "read_positions": torch.tensor([len(r) - 1 for r in rows], dtype=torch.int64),
        "margin": torch.stack([it["margin"] for it in items]).float(),
    }
    if all("reference" in it for it in items):
        batch["reference"] = torch.stack([it["reference"] for it in items])
    return batch


def count_pairs(batch: dict) -> int:
    return int(batch["margin"].numel())


def open_pair_shards(cfg, patterns, key: str, tokenizer) -> list:
    """The pair shards the recipe's patterns name (mask stream + pairs index), or ConfigError."""
    prefixes = resolve_shard_prefixes(cfg.data.root, list(patterns), key, cfg.data.prepare_hint)
    shards = open_shards(prefixes, expect_tokenizer_hash=tokenizer.hash)
    for shard in shards:
        if not shard.has_mask or not pairs_path(shard.prefix).is_file():
            raise ConfigError(
                key,
                f"{shard.prefix!r} is not a pair shard (mask stream + {pairs_path(shard.prefix).name}) "
                "written by moss-data pairs",
            )
    return shards


def pair_datasets(cfg, tokenizer, stage_name: str, is_main: bool) -> tuple[PairDataset, PairDataset | None]:
    """The recipe's train and held-out pairs fitted to data.seq_len (stage=reward and stage=dpo);
    what fitting did is printed and kept with the run (pair_data.json, by rank 0)."""
    data = cfg.data
    if not data.train_shards:
        raise ConfigError(
            "data.train_shards", f"stage={stage_name} reads pair shards (moss-data pairs) from data.train_shards"
        )
    train = PairDataset(open_pair_shards(cfg, data.train_shards, "data.train_shards", tokenizer), data.seq_len)
    valid = (
        PairDataset(open_pair_shards(cfg, data.valid_shards, "data.valid_shards", tokenizer), data.seq_len)
        if data.valid_shards
        else None
    )
    report = {"train": train.report.as_dict(), "valid": valid.report.as_dict() if valid else None}
    if is_main:
        print(f"[moss-train] {stage_name} pairs (seq_len {data.seq_len}): {report}", flush=True)
        out = Path(cfg.run.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "pair_data.json").write_text(json.dumps({"seq_len": data.seq_len, **report}, indent=1) + "\n")
    if len(train) == 0:
        raise ConfigError("data.seq_len", f"no training pair fits in {data.seq_len} tokens: {report['train']}")
    return train, valid if valid is not None and len(valid) else None
