"""``moss-eval``: evaluate any moss-train checkpoint or HF export.

    moss-eval tool-use MODEL --dialogues valid.jsonl [--limit N] [--quality N/K|best|worst] [--out F]
    moss-eval compare --dialogues valid.jsonl --reward-model RUN [--preference RUN] [--dpo RUN --sft RUN]
                      [--samples 4] [--temperature 0.7] [--top-p 0.8] [--all-levels] [--out F]

MODEL (and every RUN): a moss-train run / checkpoints / step directory, a moss-export directory,
or an HF CodeGen / MOSS directory. The tokenizer is the directory's own, else the one its
recipe names, else --tokenizer. Dialogues are moss-003 records whose first turn has a ``check``
(moss_train/eval/tool_use.py; the demo dialogues of ``moss-data sft --demo`` carry one).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from moss_train import format as fmt
from moss_train.chat.protocol import Settings
from moss_train.eval import compare, tool_use


def _records(path: str, limit: int) -> list[dict]:
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as error:
        raise SystemExit(f"moss-eval: --dialogues: {error}") from None
    records = tool_use.checked(json.loads(line) for line in lines if line.strip())
    if not records:
        raise SystemExit(f"moss-eval: {path} has no dialogue with a check (see moss_train/eval/tool_use.py)")
    return records[: limit or None]


def _quality(model_dir: str, text: str | None) -> tuple[int, int, str] | None:
    from moss_train.chat.cli import choose_quality

    form = fmt.find_quality_form(model_dir)
    quality = choose_quality(text, form)
    return None if quality is None else (*quality, form["template"] if form else fmt.QUALITY_TEMPLATE)


def _write(result: dict, out: str | None) -> None:
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def cmd_tool_use(args) -> int:
    from moss_train.chat.cli import find_tokenizer
    from moss_train.checkpoint.export import load_model

    records = _records(args.dialogues, args.limit)
    quality = _quality(args.model, args.quality)
    asked = records if quality is None else compare.conditioned(records, *quality)
    model, tokenizer = load_model(args.model), find_tokenizer(args.model, args.tokenizer)
    settings = Settings(temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    # Asked with a tag, the model answers the tagged prompt; the verdict is on the plain record.
    answers = tool_use.answer_first_turns(model, tokenizer, asked, settings)
    result = tool_use.score_answers(records, answers, settings)
    if quality is not None:
        result["quality"] = f"{quality[0]}/{quality[1]}"
    print(tool_use.summary_line(result))
    for example in result["examples"][:3]:
        print(f"  {example['human']}\n    commands: {example['commands']}\n    reply: {example['reply']}")
    _write(result, args.out)
    return 0


def cmd_compare(args) -> int:
    from moss_train.chat.cli import find_tokenizer
    from moss_train.checkpoint.export import REWARD, load_model

    records = _records(args.dialogues, args.limit)
    tokenizer = find_tokenizer(args.sft or args.preference or args.dpo or args.reward_model, args.tokenizer)
    reward_model = load_model(args.reward_model, REWARD)
    greedy = args.temperature <= 0
    samples = 1 if greedy else args.samples  # greedy answers repeat
    settings = Settings(temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    result: dict = {
        "sampling": {"samples": samples, "temperature": args.temperature, "top_p": args.top_p, "seed": args.seed}
    }

    def figures(model, asked=None) -> dict:
        return compare.answer_figures(model, tokenizer, records, reward_model, asked, samples, settings)

    if args.preference:
        form = fmt.find_quality_form(args.preference)
        if form is None:
            raise SystemExit(
                f"moss-eval: --preference {args.preference} has no {fmt.QUALITY_FILE}: not a stage=preference run"
            )
        model, levels = load_model(args.preference), int(form["levels"])
        chosen = range(1, levels + 1) if args.all_levels else (levels, 1)
        per_level = compare.by_quality_level(model, tokenizer, records, form, reward_model, samples, settings, chosen)
        result["best_tag"], result["worst_tag"] = per_level[levels], per_level[1]
        if args.all_levels:
            result["by_level"] = {str(level): per_level[level] for level in sorted(per_level)}
    if args.dpo:
        result["dpo"] = figures(load_model(args.dpo))
    if args.sft:
        result["sft"] = figures(load_model(args.sft))
    how = "greedy" if greedy else f"{samples} sampled at temperature {args.temperature}, top_p {args.top_p}"
    print(
        f"held-out prompts: {len(records)}, answers {how}; "
        "right = right command and result stated; reward = the reward model"
    )
    rows = [(name, row) for name, row in result.items() if name not in ("sampling", "by_level")]
    rows += [(f"level {level}", row) for level, row in result.get("by_level", {}).items()] if args.all_levels else []
    for name, row in rows:
        reward = "" if row["reward_mean"] is None else f"   reward {row['reward_mean']:+.3f}"
        print(
            f"  {name:<10} right {tool_use.format_rate(row['right'])}   "
            f"judge {row['judge_mean']:.3f}/{tool_use.JUDGE_MAX}"
            f"   tool called {row['tool_called']['rate']:6.1%}{reward}"
        )
    _write(result, args.out)
    return 0


def _sampling_arguments(p: argparse.ArgumentParser, temperature: float, top_p: float) -> None:
    p.add_argument("--temperature", type=float, default=temperature, help="0: greedy")
    p.add_argument("--top-p", type=float, default=top_p)
    p.add_argument("--seed", type=int, default=0)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="moss-eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "tool-use", help="greedy two-pass tool use on checked dialogues (right command and result stated)"
    )
    p.add_argument("model")
    p.add_argument(
        "--dialogues", required=True, help="moss-003 jsonl whose first turns carry a check (the demo's valid.jsonl)"
    )
    p.add_argument("--tokenizer")
    p.add_argument("--limit", type=int, default=0, help="only the first N checked dialogues")
    p.add_argument(
        "--quality",
        help="N/K, best or worst: ask a tag-conditioned model for this level (default: best where it has tags)",
    )
    p.add_argument("--out", help="also write the figures as JSON here")
    _sampling_arguments(p, 0.0, 1.0)
    p.set_defaults(func=cmd_tool_use)

    p = sub.add_parser(
        "compare", help="best vs worst quality tag, DPO vs its SFT start: judged and reward-scored answers"
    )
    p.add_argument("--dialogues", required=True)
    p.add_argument("--reward-model", required=True, help="a stage=reward run or its export")
    p.add_argument("--preference", help="a stage=preference run (tag-conditioned)")
    p.add_argument("--dpo", help="a stage=dpo run")
    p.add_argument("--sft", help="the SFT run DPO started from")
    p.add_argument(
        "--all-levels",
        action="store_true",
        help="ask the tag-conditioned model for every level, not only best and worst",
    )
    p.add_argument("--tokenizer")
    p.add_argument("--limit", type=int, default=0)
    p.add_argument("--samples", type=int, default=4, help="answers per prompt (sampling only)")
    p.add_argument("--out")
    _sampling_arguments(p, compare.MOSS_SAMPLING.temperature, compare.MOSS_SAMPLING.top_p)
    p.set_defaults(func=cmd_compare)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
