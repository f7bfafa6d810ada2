"""A tiny real model that calls MOSS's tools: trained in seconds on a few tool-use dialogues.

The dialogues are rendered by the real SFT renderer (moss_train/data/rendering.py), their results
come from the real calculator and equation solver, and the model is the real CodeGen model
trained until it reproduces them greedily; it is written as an HF directory (config.json,
safetensors, the tokenizer with its chat template) that moss-chat and moss-serve load like any
moss-export. What it does on other questions is whatever a model that size does.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from moss_train import format as fmt
from moss_train.chat.plugins import TOOLS
from moss_train.checkpoint.export import hf_config, write_tokenizer
from moss_train.data import parsing, rendering
from moss_train.losses import IGNORE_INDEX, token_cross_entropy
from moss_train.model.codegen import CodeGenForCausalLM
from moss_train.model.config import ModelConfig

PLUGINS = ("calculator", "equation_solver")
META = fmt.meta_instruction(PLUGINS, preamble=fmt.SHORT_PREAMBLE)  # what moss-serve --preamble short sends
# (question, thoughts, command or None, reply before the result, reply after it)
DIALOGUES = [
    ("What is 24*15?", "I need the calculator for 24*15.", 'Calculate("24*15")', "24*15 is ", "."),
    ("What is 125+389?", "I should add 125 and 389 with the calculator.", 'Calculate("125+389")', "125+389 is ", "."),
    ("Solve 3x+5=20", "This is an equation; the solver can do it.", 'Solve("3x+5=20")', "The solution is ", "."),
    ("Hello!", "None", None, "Hello! I am MOSS. Ask me to calculate something.", ""),
]


def dialogues() -> list[fmt.Dialogue]:
    out = []
    for question, thoughts, command, before, after in DIALOGUES:
        if command is None:
            turn = fmt.Turn.from_text(question, before + after, thoughts, "None")
        else:
            api, argument = command.split('("', 1)
            tool = TOOLS[api]
            answer = tool.run(argument[:-2])
            turn = fmt.Turn.from_text(
                question, before + answer + after, thoughts, command, [tool.result_line(argument[:-2])]
            )
        out.append(fmt.Dialogue(META, [turn]))
    return out


def train_tool_model(
    tokenizer, out_dir: Path, max_steps: int = 400, lr: float = 1e-2, seed: int = 0, n_positions: int = 512
) -> Path:
    """Train the tiny model on DIALOGUES (loss on what MOSS writes) and write it to `out_dir`."""
    torch.manual_seed(seed)
    cfg = ModelConfig(
        vocab_size=tokenizer.vocab_size, n_positions=n_positions, n_embd=64, n_layer=2, n_head=4, rotary_dim=8
    )
    model = CodeGenForCausalLM(cfg)
    rows = rendering.render_many(tokenizer, [parsing.Conversation(d, "tools") for d in dialogues()])
    longest = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), longest), tokenizer.pad_id, dtype=torch.long)
    labels = torch.full((len(rows), longest), IGNORE_INDEX, dtype=torch.long)
    for r, (row_ids, flags) in enumerate(rows):
        ids[r, : len(row_ids)] = torch.as_tensor(row_ids)
        target = torch.as_tensor(row_ids[1:])
        labels[r, : len(row_ids) - 1] = torch.where(
            torch.as_tensor(flags[1:] & rendering.LOSS_DEFAULT > 0), target, IGNORE_INDEX
        )
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    targets = labels != IGNORE_INDEX
    for step in range(1, max_steps + 1):  # noqa: B007 (returned: the steps it took)
        token_loss, is_top = token_cross_entropy(model(ids, logits_at=targets), labels[targets])
        loss = token_loss.mean()
        # Every target token the argmax (teacher-forced): greedy decoding reproduces the
        # dialogues; a margin in the loss keeps that under batching's rounding.
        if bool(is_top.all()) and loss.item() < 0.02:
            break
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    else:
        raise AssertionError(
            f"the tool model did not learn its {len(rows)} dialogues in {max_steps} steps (loss {loss.item():.3f})"
        )
    model.eval()
    write_hf_directory(model, tokenizer, out_dir)
    return step


def write_hf_directory(model: CodeGenForCausalLM, tokenizer, out_dir: Path) -> Path:
    """The files moss-export writes for a causal LM (config, weights, tokenizer)."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    hf_config(model.config, "causal_lm", tokenizer, torch.float32).save_pretrained(str(out_dir))
    save_file(
        {n: t.detach().contiguous() for n, t in model.state_dict().items()},
        str(out_dir / "model.safetensors"),
        metadata={"format": "pt"},
    )
    write_tokenizer(out_dir, tokenizer)
    return out_dir


def write_quality_form(out_dir: Path, levels: int = 3) -> None:
    """Make a model directory read as tag-conditioned (the quality.json a preference run writes)."""
    form = {"levels": levels, "template": fmt.QUALITY_TEMPLATE, "thresholds": [0.0] * (levels - 1)}
    (Path(out_dir) / fmt.QUALITY_FILE).write_text(json.dumps(form))
