"""`moss-serve MODEL_DIR ...`: an OpenAI-compatible API and a web chat on loopback.

    moss-serve runs/quickstart-sft --preamble short --plugins calculator,equation_solver
    moss-serve sft=runs/quickstart-sft tagged=runs/quickstart-preference --port 8001
    moss-serve hf-out/ --host 0.0.0.0 --api-key "$(cat key.txt)"

MODEL_DIR: anything moss-chat loads (a moss-train run / checkpoints / step directory, a
moss-export, an HF CodeGen or MOSS directory), optionally as NAME=DIR; the model's id in the API
is NAME, else the directory's name. Several models are served side by side (one decoding
thread each). Then open http://127.0.0.1:8000/ for the chat page. See docs/serve.md.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from moss_train.chat.cli import add_model_arguments, find_tokenizer, load_plugins, read_preamble

API_KEY_ENV = "MOSS_SERVE_API_KEY"
PROG = "moss-serve"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog=PROG, description="serve MOSS-format models: an OpenAI-compatible API and a web chat"
    )
    p.add_argument(
        "models",
        nargs="+",
        metavar="MODEL_DIR",
        help="[NAME=]DIR: a run, checkpoint, export, HF CodeGen or MOSS directory",
    )
    add_model_arguments(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--api-key",
        default=os.environ.get(API_KEY_ENV),
        help=f"require 'Authorization: Bearer KEY' on /v1/ (default: ${API_KEY_ENV}; none: no key)",
    )
    p.add_argument(
        "--max-batch",
        type=int,
        default=16,
        help="turns decoded together per model (default 16); more wait in order; 1 = one at a time",
    )
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    args = p.parse_args(argv)
    if args.max_batch < 1:
        p.error("--max-batch must be at least 1")
    return args


def model_entries(specs: list[str]) -> list[tuple[str, str]]:
    """(id, directory) per MODEL_DIR argument; ids must differ."""
    entries = []
    for spec in specs:
        name, sep, directory = spec.partition("=")
        if not sep or not name or "/" in name:
            name, directory = Path(spec.rstrip("/")).name or spec, spec
        entries.append((name, directory))
    ids = [name for name, _ in entries]
    duplicates = sorted({name for name in ids if ids.count(name) > 1})
    if duplicates:
        raise SystemExit(f"{PROG}: two models named {', '.join(duplicates)}; name them: NAME=DIR")
    return entries


def build_models(args: argparse.Namespace) -> list:
    import torch

    from moss_train import format as fmt
    from moss_train.chat.sandbox import default_sandbox
    from moss_train.checkpoint.export import load_model
    from moss_train.serve.api import ServedModel
    from moss_train.serve.engine import Engine

    if args.threads:
        torch.set_num_threads(args.threads)
    plugins = load_plugins(args, PROG)
    preamble = read_preamble(args.preamble)
    served = []
    for name, directory in model_entries(args.models):
        model, tokenizer = load_model(directory), find_tokenizer(directory, args.tokenizer, PROG)
        engine = Engine(model, tokenizer, args.max_batch)
        served.append(ServedModel(name, engine, plugins, preamble, fmt.find_quality_form(directory)))
        print(
            f"{PROG}: {name}: {directory} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
            f"context {model.config.n_positions})",
            flush=True,
        )
    if any(name in ("calculator", "equation_solver") for name in plugins):
        default_sandbox().call("moss_train.chat.plugins:calculate_or_raise", "1")  # start the tool worker now
    return served


def main(argv=None) -> int:
    import uvicorn

    from moss_train.serve.api import create_app

    args = parse_args(argv)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        print(
            f"{PROG}: warning: --host {args.host} without --api-key: "
            "anyone who can reach this address can use the model",
            file=sys.stderr,
        )
    app = create_app(build_models(args), args.api_key)
    logging.getLogger("moss_train.serve").setLevel(args.log_level.upper())
    print(f"{PROG}: http://{args.host}:{args.port}/ (API: /v1/chat/completions, /v1/models)", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
