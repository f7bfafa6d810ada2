"""``moss-data sft``: render dialogues into SFT shards (token ids + per-token loss flags).

    moss-data sft --input FILES... --tokenizer DIR --out DIR [--valid-input FILES... | --valid-fraction F]
                  [--format auto|moss003|messages|alpaca] [--meta-instruction TEXT|@FILE]
                  [--plugins calculator,...] [--category plugins|field] [--max-length N]
    moss-data sft --demo --tokenizer DIR --out DIR     # the built-in bilingual tool-use set

Writes ``DIR/shards/{train,valid}.{category}`` (THE shard format with its ``.mask`` stream; one
shard per category, whose ``source`` is the category), ``DIR/rejects.jsonl`` (every skipped
record with its reason) and ``DIR/summary.json``. Records in = conversations written + rejected.
The shard directory is replaced as a whole, so no shard of an earlier run lingers.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from data_pipelines.render_common import ParsedRecord, RecordSource, ShardOutputs, render_records
from moss_train import format as fmt
from moss_train.data import parsing, rendering
from moss_train.tokenizer import longest_token_chars

CHUNK = 256  # conversations rendered per tokenizer batch


class _Outputs(ShardOutputs):
    """One shard per (split, category), and the truncation and loss-token counts."""

    written_key = "conversations_written"

    def __init__(self, *args):
        super().__init__(*args)
        self.truncated = 0
        self.turns_dropped = 0
        self.loss_tokens: Counter = Counter()
        self.token_chars = longest_token_chars(self.tokenizer)

    def write(self, split: str, conversation: parsing.Conversation, ids, flags) -> None:
        category = conversation.category
        self.writer((split, category), f"{split}.{category}", source=category).add_document(ids, flags)
        for name, bit in rendering.LOSS_MASKS.items():
            self.loss_tokens[name] += int(((flags & bit) > 0).sum())

    def close(self) -> dict:
        shards = {}
        for (split, category), writer in sorted(self.writers.items()):
            manifest = writer.close()
            shards[f"{split}.{category}"] = {"conversations": manifest["n_docs"], "tokens": manifest["n_tokens"]}
        return shards

    def count_written(self, shards: dict) -> int:
        return sum(s["conversations"] for s in shards.values())

    def extra_counts(self) -> dict:
        return {"truncated": self.truncated, "turns_dropped": self.turns_dropped, "loss_tokens": dict(self.loss_tokens)}


def render_sft(
    inputs: Sequence[str | Path],
    tokenizer_dir: str | Path,
    out: str | Path,
    *,
    valid_inputs: Sequence[str | Path] = (),
    valid_fraction: float = 0.0,
    format: str = "auto",
    meta_instruction: str | None = None,
    category_from: str = "plugins",
    max_length: int = 0,
    seed: int = 0,
) -> dict:
    """Render the records of `inputs` (and `valid_inputs`) into SFT shards under `out`; the summary."""
    provenance = {
        "inputs": [str(p) for p in inputs],
        "valid_inputs": [str(p) for p in valid_inputs],
        "format": format,
        "tokenizer_dir": str(tokenizer_dir),
        "max_length": max_length,
        "mask_bits": {
            "loss_default": rendering.LOSS_DEFAULT,
            "loss_moss_reference": rendering.LOSS_MOSS_REFERENCE,
            "turn_start": rendering.TURN_START,
        },
    }
    return render_records(
        RecordSource(inputs, valid_inputs, valid_fraction, seed),
        tokenizer_dir,
        out,
        provenance=provenance,
        make_outputs=_Outputs,
        parse=lambda record: parsing.parse_record(record, format, meta_instruction, category_from),
        render_chunk=lambda pending, outputs: _render_chunk(pending, outputs, max_length),
        chunk_size=CHUNK,
    )


def _render_chunk(pending: list[ParsedRecord], outputs: _Outputs, max_length: int) -> None:
    """Render, cut to whole turns within max_length tokens, write. Turns that cannot fit by their
    characters alone are dropped before tokenizing, so a huge record costs no tokenizer time."""
    fitting, dropped = [], []
    for record in pending:
        turns = len(record.parsed.dialogue.turns)
        fit = rendering.turns_within_chars(record.parsed, max_length * outputs.token_chars) if max_length else turns
        if fit == 0:
            limit = max_length * outputs.token_chars
            detail = (
                f"the first turn spans over {limit} characters, more than {max_length} tokens hold "
                f"(a token spans at most {outputs.token_chars})"
            )
            outputs.reject(record.where, parsing.FIRST_TURN_TOO_LONG, detail, record.raw)
            continue
        fitting.append(record._replace(parsed=rendering.first_turns(record.parsed, fit)) if fit < turns else record)
        dropped.append(turns - fit)
    rendered = rendering.render_many(outputs.tokenizer, [record.parsed for record in fitting])
    for (where, split, raw, conversation), (ids, flags), turns_dropped in zip(fitting, rendered, dropped):
        if max_length and len(ids) > max_length:
            kept = rendering.kept_length(flags, max_length)
            if kept == 0:
                outputs.reject(
                    where,
                    parsing.FIRST_TURN_TOO_LONG,
                    f"{len(ids)} tokens; the first turn does not fit in {max_length}",
                    raw,
                )
                continue
            turns_dropped += int(((flags[kept:] & rendering.TURN_START) > 0).sum())
            ids, flags = ids[:kept], flags[:kept]
        if turns_dropped:
            outputs.truncated += 1
            outputs.turns_dropped += turns_dropped
        outputs.write(split, conversation, ids, flags)


# ------------------------------------------------------------------------------------- CLI
def _meta_argument(value: str | None, plugins: str | None) -> str | None:
    if value is not None and plugins is not None:
        raise SystemExit("moss-data sft: give --meta-instruction or --plugins, not both")
    if plugins is not None:
        return fmt.meta_instruction([p for p in plugins.split(",") if p])
    if value is not None and value.startswith("@"):
        return Path(value[1:]).read_text(encoding="utf-8")
    return value


def cmd_sft(args) -> int:
    inputs, valid_inputs = list(args.input or []), list(args.valid_input or [])
    if args.demo:
        from data_pipelines.demo_dialogues import write_demo_dialogues

        paths = write_demo_dialogues(Path(args.out) / "dialogues", args.demo_train, args.demo_valid, args.seed)
        inputs, valid_inputs = [paths["train"], *inputs], [paths["valid"], *valid_inputs]
    if not inputs:
        raise SystemExit("moss-data sft: give --input FILES (or --demo)")
    summary = render_sft(
        inputs,
        args.tokenizer,
        args.out,
        valid_inputs=valid_inputs,
        valid_fraction=args.valid_fraction,
        format=args.format,
        meta_instruction=_meta_argument(args.meta_instruction, args.plugins),
        category_from=args.category,
        max_length=args.max_length,
        seed=args.seed,
    )
    _print_summary(summary)
    return 0


def _print_summary(summary: dict) -> None:
    lines = [
        f"sft: {summary['records_in']} records -> {summary['conversations_written']} conversations, "
        f"{summary['rejected']} rejected{' ' + str(summary['rejected_by_reason']) if summary['rejected'] else ''}, "
        f"{summary['truncated']} truncated ({summary['turns_dropped']} turns dropped) in {summary['seconds']}s",
        f"  {'shard':<32}{'conversations':>14}{'tokens':>12}",
    ]
    lines += [f"  {name:<32}{s['conversations']:>14}{s['tokens']:>12}" for name, s in summary["shards"].items()]
    lines.append(f"  loss-bearing tokens: {summary['loss_tokens']}; rejects: {summary['rejects_file']}")
    if summary["empty_inputs"]:
        lines.append(f"  warning: no records in {', '.join(summary['empty_inputs'])}")
    print("\n".join(lines))


def add_parser(sub) -> None:
    """Register ``moss-data sft`` on the moss-data subcommand parser."""
    p = sub.add_parser("sft", help="render dialogues (moss-003, messages, alpaca) into SFT shards with loss masks")
    p.add_argument(
        "--input",
        nargs="+",
        help="jsonl / json files, folders or globs of dialogues (.gz/.bz2/.xz/.zst too), read in the order given",
    )
    p.add_argument("--valid-input", nargs="+", help="the same, for the held-out split")
    p.add_argument("--valid-fraction", type=float, default=0.0, help="hold out this share of --input (by content hash)")
    p.add_argument("--tokenizer", required=True, help="tokenizer directory (the base model's)")
    p.add_argument("--out", required=True, help="output directory (shards/, rejects.jsonl, summary.json)")
    p.add_argument(
        "--format", default="auto", choices=["auto", *parsing.FORMATS], help="input format (default: per record)"
    )
    p.add_argument("--meta-instruction", help="meta instruction for every record (text, or @FILE)")
    p.add_argument(
        "--plugins", help="or: the MOSS meta instruction with these plugins enabled (e.g. calculator,equation_solver)"
    )
    p.add_argument(
        "--category",
        default="plugins",
        choices=["plugins", "field"],
        help="category: from the enabled plugins (plain/calculator/.../mix) or the record's category field",
    )
    p.add_argument(
        "--max-length", type=int, default=0, help="cut conversations to whole turns within N tokens (0: keep all)"
    )
    p.add_argument("--demo", action="store_true", help="generate and render the built-in bilingual tool-use dialogues")
    p.add_argument("--demo-train", type=int, default=4000, help="demo dialogues for training (default 4000)")
    p.add_argument("--demo-valid", type=int, default=200, help="held-out demo dialogues (default 200)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_sft)
