"""`moss-export CHECKPOINT OUT_DIR`: a moss-train checkpoint -> a Hugging Face model directory.

    moss-export runs/sft-tiny OUT_DIR                         (the run's latest checkpoint)
    moss-export runs/sft-tiny/checkpoints/step_00000300 OUT_DIR --dtype bf16 --max-shard-size 2GB
    moss-export runs/sft-lora OUT_DIR [--lora adapter [--base BASE_HF_DIR]]   (a LoRA run)
    moss-export runs/sft-tiny OUT_DIR --quantize int4                        (int8 / int4 weight-only)

CHECKPOINT is a run directory, its checkpoints/ directory, or one step_N directory. The result
loads with transformers' AutoModelForCausalLM / AutoTokenizer (no trust_remote_code); a reward
model exports in the format described in moss_train/checkpoint/export.py.
"""

from __future__ import annotations

import argparse
import sys


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="moss-export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("checkpoint", help="run, checkpoints or step_N directory")
    parser.add_argument("out_dir", help="the HF directory to write")
    parser.add_argument(
        "--dtype", choices=("fp32", "bf16", "fp16"), default="fp32", help="weights dtype (default fp32)"
    )
    parser.add_argument(
        "--max-shard-size", default="5GB", help="largest safetensors file, e.g. 2GB, 500MB (default 5GB)"
    )
    parser.add_argument(
        "--tokenizer", default=None, help="tokenizer directory (default: the one the run's recipe names)"
    )
    parser.add_argument(
        "--preamble",
        default=None,
        help="the chat template's meta-instruction preamble: moss, short or a "
        "file (default: the one the run's training dialogues have)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
    parser.add_argument(
        "--quantize",
        choices=("int8", "int4"),
        default=None,
        help="weight-only quantized weights that "
        "transformers loads through config.json's quantization_config (needs moss-train[quantize])",
    )
    parser.add_argument(
        "--lora",
        choices=("merged", "adapter"),
        default="merged",
        help="a LoRA checkpoint: merged into its base (plain HF weights, default) or a peft adapter directory",
    )
    parser.add_argument(
        "--base",
        default=None,
        help="--lora adapter: an HF export of the base, when stage.init_from was a moss-train checkpoint",
    )
    return parser.parse_args(argv)


def preamble_argument(value: str | None) -> str | None:
    from pathlib import Path

    from moss_train import format as fmt

    return value if value is None else fmt.PREAMBLES.get(value) or Path(value).read_text(encoding="utf-8")


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
            preamble=preamble_argument(args.preamble),
            lora_format=args.lora,
            base_dir=args.base,
            quantize=args.quantize,
        )
    except (CheckpointError, FileExistsError, ValueError, ImportError) as error:
        print(f"moss-export: error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
