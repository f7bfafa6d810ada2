"""`moss-chat MODEL_DIR`: talk to a trained or exported MOSS-format model, with tools.

    moss-chat runs/quickstart-sft --preamble short --plugins calculator,equation_solver
    moss-chat hf-out/ --prompt "What is 24*15?" --show-thoughts --greedy
    moss-chat hf-out/ --plugins calculator,web_search=my_pkg.search:run --quality 3/3

MODEL_DIR: a moss-train run / checkpoints / step directory or an HF directory (moss-export's
output, an HF CodeGen or MOSS directory). The tokenizer is the directory's own, else the one the
run's recipe names, else --tokenizer. In the REPL, ``/reset`` starts a new conversation and
``/quit`` (or Ctrl-D) ends; arrow keys recall earlier lines.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from moss_train import format as fmt

# MOSS 003's recommended sampling (its README): temperature 0.7, top_p 0.8, repetition 1.02.
DEFAULTS = dict(temperature=0.7, top_p=0.8, top_k=0, repetition_penalty=1.02, max_new_tokens=256)


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """The options that say what a model talks with (shared with moss-serve)."""
    p.add_argument("--tokenizer", help="tokenizer directory (default: the model's own or its recipe's)")
    p.add_argument(
        "--plugins",
        default="",
        help="comma list: calculator, equation_solver, web_search=BACKEND, "
        "text2img=BACKEND (BACKEND: module:function or http(s)://url); default none",
    )
    p.add_argument(
        "--preamble", default="moss", help="meta-instruction preamble: moss, short (the demo data's) or a file"
    )
    p.add_argument(
        "--tool-timeout", type=float, default=20.0, help="seconds for a configured web_search / text2img backend"
    )


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="moss-chat", description="chat with a MOSS-format model (two-pass tool use)")
    p.add_argument("model", help="moss-train run/checkpoint directory or HF model directory")
    add_model_arguments(p)
    p.add_argument("--prompt", action="append", help="answer this and exit (repeat for a multi-turn script)")
    p.add_argument("--show-thoughts", action="store_true", help="also print inner thoughts, commands and tool results")
    p.add_argument(
        "--quality",
        help="N/K, best or worst: the quality level to ask a tag-conditioned model for "
        "(default: best, when the model carries its tag form, quality.json)",
    )
    p.add_argument(
        "--meta-instruction", help="a file with the whole meta instruction (replaces --preamble and the plugin lines)"
    )
    p.add_argument("--greedy", action="store_true", help="greedy decoding (temperature 0)")
    for name, value in DEFAULTS.items():
        p.add_argument("--" + name.replace("_", "-"), type=type(value), default=value)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def choose_quality(text: str | None, form: dict | None) -> tuple[int, int] | None:
    """--quality as (level, levels) (see format.choose_quality); a clear exit when it is wrong."""
    try:
        return fmt.choose_quality(text, form)
    except ValueError as error:
        raise SystemExit(f"moss-chat: --quality {error}") from None


def find_tokenizer(model_dir: str, explicit: str | None, prog: str = "moss-chat"):
    from moss_train.checkpoint.sources import MossTrainCheckpoint, open_source
    from moss_train.tokenizer import load_tokenizer

    if explicit:
        return load_tokenizer(explicit)
    source = open_source(model_dir)
    directory = source.recipe_tokenizer() if isinstance(source, MossTrainCheckpoint) else Path(model_dir)
    if directory is None:
        raise SystemExit(f"{prog}: cannot find the tokenizer of {model_dir}; pass --tokenizer DIR")
    return load_tokenizer(directory)


def load_plugins(args: argparse.Namespace, prog: str = "moss-chat") -> dict:
    from moss_train.chat.plugins import build_plugins

    try:
        return build_plugins(args.plugins, timeout_s=args.tool_timeout)
    except (ValueError, ImportError, AttributeError) as error:
        raise SystemExit(f"{prog}: --plugins: {error}") from None


def read_preamble(name: str) -> str:
    """--preamble: a named one (moss, short) or the text of a file."""
    preamble = fmt.PREAMBLES.get(name)
    return preamble if preamble is not None else Path(name).read_text(encoding="utf-8")


def build_session(args: argparse.Namespace):
    from moss_train.chat.protocol import ChatSession, Settings
    from moss_train.checkpoint.export import load_model

    plugins = load_plugins(args)
    preamble = read_preamble(args.preamble)
    meta = Path(args.meta_instruction).read_text(encoding="utf-8") if args.meta_instruction else None
    settings = Settings(
        max_new_tokens=args.max_new_tokens,
        temperature=0.0 if args.greedy else args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
    )
    form = fmt.find_quality_form(args.model)
    quality = choose_quality(args.quality, form)
    template = form["template"] if form else fmt.QUALITY_TEMPLATE
    model, tokenizer = load_model(args.model), find_tokenizer(args.model, args.tokenizer)
    return ChatSession(
        model, tokenizer, plugins, settings, meta=meta, preamble=preamble, quality=quality, quality_template=template
    )


def show(result, show_thoughts: bool, out=sys.stdout) -> None:
    if show_thoughts:
        print(f"[thoughts]{result.inner_thoughts}", file=out)
        print(f"[commands]{result.commands}", file=out)
        for call in result.tool_calls:
            print(f"[result] {call.line}" + (f"   ({call.error})" if call.error else ""), file=out)
    print(f"MOSS: {result.reply}" + ("" if result.finished else " [cut off: --max-new-tokens]"), file=out, flush=True)


def repl(session, show_thoughts: bool) -> None:
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    print("moss-chat: /reset starts a new conversation, /quit ends", flush=True)
    while True:
        try:
            line = input("You: ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if line in ("/quit", "/exit"):
            return
        if line == "/reset":
            session.reset()
            print("(new conversation)")
        elif line:
            show(session.ask(line), show_thoughts)


def main(argv=None) -> int:
    args = parse_args(argv)
    from moss_train.errors import CheckpointError
    from moss_train.tokenizer import TokenizerError

    try:
        session = build_session(args)
    except (CheckpointError, TokenizerError, OSError, ValueError) as error:  # the model or tokenizer cannot be loaded
        print(f"moss-chat: error: {error}", file=sys.stderr)
        return 1
    if args.prompt:
        for prompt in args.prompt:
            print(f"You: {prompt}")
            show(session.ask(prompt), args.show_thoughts)
    else:
        repl(session, args.show_thoughts)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
