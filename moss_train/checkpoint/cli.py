"""`moss-export CHECKPOINT OUT_DIR`: a moss-train checkpoint -> a Hugging Face model directory.

    moss-export runs/sft-tiny OUT_DIR                         (the run's latest checkpoint)
    moss-export runs/sft-tiny/checkpoints/step_00000300 OUT_DIR --dtype bf16 --max-shard-size 2GB

CHECKPOINT is a run directory, its checkpoints/ directory, or one step_N directory. The result
loads with transformers' AutoModelForCausalLM / AutoTokenizer (no trust_remote_code); a reward
model exports in the format described in moss_train/checkpoint/export.py.
"""

from __future__ import annotations

import argparse
import sys


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="moss-export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="run, checkpoints or step_N directory")
    parser.add_argument("out_dir", help="the HF directory to write")
    parser.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32", help="weights dtype (default fp32)")
    parser.add_argument("--max-shard-size", default="5GB", help="largest safetensors file, e.g. 2GB, 500MB (default 5GB)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the one the run's recipe names)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from moss_train.checkpoint.export import export_checkpoint
    from moss_train.checkpoint.store import CheckpointError

    try:
        export_checkpoint(
            args.checkpoint,
            args.out_dir,
            dtype=args.dtype,
            max_shard_size=args.max_shard_size,
            tokenizer_dir=args.tokenizer,
            overwrite=args.overwrite,
        )
    except (CheckpointError, FileExistsError, ValueError) as error:
        print(f"moss-export: error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
