"""Build a model the way the trainer does (ZeRO-3 `zero.Init`, the recipe's DeepSpeed config) on
every rank and report what each rank holds; run under torchrun by tests/test_scaleout.py.

    torchrun --nproc_per_node 2 tests/zero3_probe.py OUT_DIR model=moss-16b model.n_layer=2 ...

Writes OUT_DIR/rank{R}.json: the bytes of this rank's parameter shards, the full model's bytes
in the same dtype, and the process's resident memory before / after construction and at peak.
"""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path

import psutil
import torch


def main() -> None:
    out_dir, overrides = Path(sys.argv[1]), sys.argv[2:]
    from moss_train.config import compose, to_object, validate
    from moss_train.distributed import init_distributed
    from moss_train.engine import setup
    from moss_train.model.codegen import CodeGenForCausalLM

    cfg = to_object(compose(overrides))
    validate(cfg)
    dist_info = init_distributed()
    ds_config = setup.deepspeed_config(cfg, cfg.trainer.precision, dist_info.world_size)
    rss_before = psutil.Process().memory_info().rss
    with setup.model_construction_context(ds_config):
        model = CodeGenForCausalLM(cfg.model)
    params = list(model.parameters())
    report = {
        "rank": dist_info.rank,
        "world_size": dist_info.world_size,
        "num_params": sum(p.ds_numel for p in params),
        "full_bytes": sum(p.ds_numel * p.ds_tensor.element_size() for p in params),
        "shard_bytes": sum(p.ds_tensor.numel() * p.ds_tensor.element_size() for p in params),
        "local_full_tensors": sum(p.numel() for p in params),  # elements held unpartitioned
        "dtype": str(params[0].ds_tensor.dtype),
        "rss_before": rss_before,
        "rss_after": psutil.Process().memory_info().rss,
        "rss_peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"rank{dist_info.rank}.json").write_text(json.dumps(report))
    torch.distributed.barrier()


if __name__ == "__main__":
    main()
