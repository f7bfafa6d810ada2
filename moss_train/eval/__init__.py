"""Evaluation of any checkpoint or export: tool use on checked dialogues (tool_use), the
preference comparison of tag-conditioned and DPO models (compare), and the run report (report).
The console entry is ``moss-eval`` (moss_train/eval/cli.py)."""
