"""moss-serve under load: N concurrent streaming clients on loopback, continuous batching vs
one turn at a time.

Two real `moss-serve` processes serve the same model: `--max-batch 16` (continuous batching,
the default) and `--max-batch 1` (the baseline: turns queued and served one at a time). For N =
1, 4, 16 clients, each sends --requests-per-client streaming chat completions back to back
(greedy, so both servers generate exactly the same tokens; the bench checks the replies agree)
and the two servers take turns per N so machine noise hits both alike. Per request:

    time to first token   request sent -> the first SSE chunk carrying generated text
                          (inner thoughts count: MOSS writes them before the reply)
    tokens/s              completion tokens / (last chunk - request sent), as the client sees it

p50 and p95 of both (for tokens/s, p95 is the rate 95% of requests reach or beat), plus the
aggregate: all completion tokens / wall time of the N clients.

The model: the quickstart's SFT model (n_embd 128, 2 layers, 8k vocabulary) when it is at
--model (default /work/main/runs/quickstart-sft); else the bench makes one of that size in
--work: the demo corpus and an 8k tokenizer (moss-data prepare-pretrain-demo, smaller), the demo
dialogues (moss-data sft --demo), and a short stage=sft run from scratch (--sft-steps). Prompts:
the first human turns of the held-out demo dialogues.

    python bench/serve_latency.py                 # prints the table
    python bench/serve_latency.py --write         # also appends it to bench/RESULTS.md
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

import train_throughput as tt
from bench_report import cpu_line, publish

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
QUICKSTART_SFT = Path("/work/main/runs/quickstart-sft")
QUICKSTART_TOKENIZER = Path("/work/main/data/pretrain-demo/tokenizer")
MODES = (("batched", 16), ("sequential", 1))  # (name, --max-batch)


def run(command: list, **options) -> None:
    print("+", " ".join(map(str, command)), flush=True)
    subprocess.run([str(c) for c in command], check=True, cwd=REPO, **options)


def env() -> dict:
    variables = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", WANDB_MODE="disabled", WANDB_SILENT="true")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        variables.pop(key, None)
    return variables


def make_model(work: Path, steps: int) -> tuple[Path, Path]:
    """A quickstart-size SFT model (model=tiny, 8k vocabulary), made once in `work`."""
    data, dialogues, run_dir = work / "pretrain-demo", work / "sft-demo", work / "sft-run"
    if not (data / "tokenizer").is_dir():
        run(
            [
                BIN / "moss-data",
                "prepare-pretrain-demo",
                "--out",
                data,
                "--en-mb",
                "1.5",
                "--zh-mb",
                "1",
                "--code-mb",
                "1.5",
                "--sample-mb",
                "3",
                "--vocab-size",
                "8000",
            ],
            env=env(),
        )
    if not (dialogues / "shards").is_dir():
        run([BIN / "moss-data", "sft", "--demo", "--tokenizer", data / "tokenizer", "--out", dialogues], env=env())
    if not (run_dir / "checkpoints").is_dir():
        run(
            [
                BIN / "moss-train",
                "stage=sft",
                "model=tiny",
                "data=sft_demo",
                f"data.root={dialogues}",
                f"data.tokenizer={data / 'tokenizer'}",
                f"run.output_dir={run_dir}",
                f"trainer.max_steps={steps}",
                "trainer.global_batch_size=16",
                "trainer.micro_batch_size=8",
                "trainer.lr=2e-3",
                "trainer.warmup_steps=20",
                f"checkpoint.every={steps}",
                "logging.wandb=disabled",
                "logging.progress_bar=false",
            ],
            env=env(),
        )
    return run_dir, data / "tokenizer"


def prompts(work: Path, count: int) -> list[str]:
    from data_pipelines.demo_dialogues import write_demo_dialogues

    paths = write_demo_dialogues(work / "dialogues", n_train=50, n_valid=count, seed=0)
    records = [json.loads(line) for line in paths["valid"].read_text(encoding="utf-8").splitlines()]
    return [r["chat"]["turn_1"]["Human"].removeprefix("<|Human|>:").removesuffix("<eoh>\n").strip() for r in records][
        :count
    ]


class Server:
    def __init__(self, model: Path, tokenizer: Path, max_batch: int, port: int, threads: int):
        self.url = f"http://127.0.0.1:{port}"
        command = [
            BIN / "moss-serve",
            model,
            "--tokenizer",
            tokenizer,
            "--plugins",
            "calculator,equation_solver",
            "--preamble",
            "short",
            "--port",
            port,
            "--max-batch",
            max_batch,
            "--threads",
            threads,
            "--log-level",
            "warning",
        ]
        self.process = subprocess.Popen([str(c) for c in command], cwd=REPO, env=env())

    def wait(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise SystemExit(f"moss-serve exited with {self.process.returncode}")
            try:
                httpx.get(self.url + "/health", timeout=5).raise_for_status()
                return
            except httpx.HTTPError:
                if time.monotonic() > deadline:
                    raise SystemExit("moss-serve did not start") from None
                time.sleep(0.5)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(30)


async def one_request(client: httpx.AsyncClient, url: str, prompt: str, max_tokens: int) -> dict:
    body = {
        "messages": [{"role": "user", "content": prompt}],
        "stream": True,
        "temperature": 0,
        "max_tokens": max_tokens,
        "stream_options": {"include_usage": True},
    }
    sent = time.perf_counter()
    first = last = None
    text, tokens, tool_calls = [], 0, 0
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            for choice in chunk.get("choices", []):
                delta = choice["delta"]
                moss = delta.get("moss") or {}
                tool_calls += len(moss.get("results", []))
                generated = delta.get("content") or moss.get("inner_thoughts") or moss.get("commands")
                if generated:
                    first = first or time.perf_counter()
                    text.append(generated)
            last = time.perf_counter()
    return {
        "ttft": (first or last) - sent,
        "seconds": last - sent,
        "tokens": tokens,
        "text": "".join(text),
        "prompt": prompt,
        "tool_calls": tool_calls,
    }


async def load(
    url: str, clients: int, per_client: int, all_prompts: list[str], max_tokens: int
) -> tuple[list[dict], float]:
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=clients + 2)) as client:

        async def worker(c: int) -> list[dict]:
            return [
                await one_request(client, url, all_prompts[(c * per_client + r) % len(all_prompts)], max_tokens)
                for r in range(per_client)
            ]

        start = time.perf_counter()
        results = await asyncio.gather(*(worker(c) for c in range(clients)))
        return [r for rs in results for r in rs], time.perf_counter() - start


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def summarise(results: list[dict], wall: float) -> dict:
    rates = [r["tokens"] / r["seconds"] for r in results]
    return {
        "requests": len(results),
        "ttft_p50": percentile([r["ttft"] for r in results], 50),
        "ttft_p95": percentile([r["ttft"] for r in results], 95),
        "rate_p50": statistics.median(rates),
        "rate_p95": percentile(rates, 5),
        "aggregate": sum(r["tokens"] for r in results) / wall,
        "tokens_mean": statistics.mean(r["tokens"] for r in results),
        "with_tools": sum(r["tool_calls"] > 0 for r in results),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--model", type=Path, default=QUICKSTART_SFT, help="model directory (default: the quickstart's SFT run)"
    )
    p.add_argument(
        "--tokenizer", type=Path, default=None, help="its tokenizer (default: the quickstart's, or the bench's own)"
    )
    p.add_argument(
        "--work", type=Path, default=Path("/tmp/moss-serve-bench"), help="where a model the bench makes lives"
    )
    p.add_argument("--sft-steps", type=int, default=200)
    p.add_argument("--clients", default="1,4,16")
    p.add_argument("--requests-per-client", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=1, help="torch threads per server")
    p.add_argument("--write", action="store_true", help="append the table to bench/RESULTS.md")
    args = p.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    if args.model.is_dir():
        model, tokenizer, origin = (
            args.model,
            args.tokenizer or QUICKSTART_TOKENIZER,
            f"the quickstart SFT model ({args.model})",
        )
    else:
        model, tokenizer = make_model(args.work, args.sft_steps)
        tokenizer = args.tokenizer or tokenizer
        origin = (
            f"a quickstart-size model the bench made ({args.sft_steps} SFT steps from scratch "
            f"on the demo dialogues; {args.model} absent)"
        )
    clients = [int(c) for c in args.clients.split(",")]
    asked = prompts(args.work, max(clients) * args.requests_per_client)
    load_before = tt.load_line()
    servers = {
        name: Server(model, tokenizer, max_batch, 8600 + i, args.threads) for i, (name, max_batch) in enumerate(MODES)
    }
    rows = []
    try:
        for server in servers.values():
            server.wait()
            asyncio.run(load(server.url, 1, 1, asked, 16))  # warm-up
        for n in clients:
            texts = {}
            for name, server in servers.items():
                results, wall = asyncio.run(load(server.url, n, args.requests_per_client, asked, args.max_tokens))
                texts[name] = sorted((r["prompt"], r["text"]) for r in results)
                summary = summarise(results, wall)
                rows.append((n, name, summary))
                print(
                    f"N={n} {name}: TTFT p50 {summary['ttft_p50']:.3f}s p95 {summary['ttft_p95']:.3f}s, "
                    f"{summary['rate_p50']:.1f} tok/s p50, aggregate {summary['aggregate']:.1f} tok/s",
                    flush=True,
                )
            if len(set(map(tuple, texts.values()))) != 1:
                raise SystemExit(f"N={n}: the batched and sequential servers gave different replies")
    finally:
        for server in servers.values():
            server.stop()
    publish(render(rows, args, origin, load_before), args.write)
    return 0


def render(rows, args, origin: str, load_before: str) -> list[str]:
    lines = [
        "### serve_latency — moss-serve, N concurrent streaming clients on loopback, "
        "continuous batching vs one turn at a time",
        "",
        f"{tt.run_line(None, load_before)}; {cpu_line()}; {origin}; greedy, max_tokens {args.max_tokens}, "
        f"{args.requests_per_client} requests per client back to back, {args.threads} torch thread per server; "
        "TTFT: request -> first chunk with generated text; tokens/s: completion tokens / request time "
        "(p95: 95% of requests at least this)",
        "",
        "| clients | service | requests (with a tool call) | tokens per request | TTFT p50 s | TTFT p95 s | "
        "tokens/s per request p50 | tokens/s per request p95 | aggregate tokens/s | vs sequential |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    baseline = {n: s["aggregate"] for n, name, s in rows if name == "sequential"}
    for n, name, s in rows:
        speedup = s["aggregate"] / baseline[n] if baseline.get(n) else float("nan")
        service = "batched (--max-batch 16)" if name == "batched" else "sequential (--max-batch 1, baseline)"
        lines.append(
            f"| {n} | {service} | {s['requests']} ({s['with_tools']}) | {s['tokens_mean']:.0f} | "
            f"{s['ttft_p50']:.3f} | {s['ttft_p95']:.3f} | {s['rate_p50']:.1f} | "
            f"{s['rate_p95']:.1f} | {s['aggregate']:.1f} | {speedup:.2f}x |"
        )
    return lines


if __name__ == "__main__":
    raise SystemExit(main())
