"""Scale-out on one machine: two "nodes" over loopback, a rank failure and the restart after it
(as SLURM's srun starts it), wandb's run across the restart, and ZeRO-3 construction of the
moss-16b layer shapes with no rank ever holding the whole model."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import struct
import subprocess
import time
from pathlib import Path

import pytest

from moss_train.distributed import child_processes

from conftest import BIN, REPO, cli_env, free_port, process_running, run_cli, train_losses, train_overrides

STEPS = {"trainer.max_steps": 4, "trainer.threads": 1}
MULTINODE = str(REPO / "launch" / "multinode_deepspeed.sh")
NO_FINAL_SAVE = {"checkpoint.save_final": "false"}  # losses only: skip the final checkpoint


def assert_same_training(a: dict[int, dict], b: dict[int, dict], steps) -> None:
    for step in steps:
        assert a[step]["loss"] == pytest.approx(b[step]["loss"], rel=1e-5, abs=1e-6), step
        assert a[step]["grad_norm"] == pytest.approx(b[step]["grad_norm"], rel=1e-4), step
        assert a[step]["lr"] == b[step]["lr"], step


@pytest.fixture(scope="module")
def one_node_two_processes(pretrain_data, tmp_path_factory) -> Path:
    """The reference: one node, two processes (torchrun), four steps."""
    out = tmp_path_factory.mktemp("one-node") / "run"
    torchrun = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()), "-m", "moss_train"]
    run_cli(train_overrides(pretrain_data, out, **STEPS, **NO_FINAL_SAVE), launcher=torchrun)
    return out


def start_processes(commands: list[tuple[list[str], dict]], timeout: int = 300) -> list[subprocess.CompletedProcess]:
    """Start several commands at once (they rendezvous with each other); wait for all of them."""
    procs = [
        subprocess.Popen(cmd, cwd=REPO, env=cli_env(**env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for cmd, env in commands
    ]
    results = []
    for proc, (cmd, _) in zip(procs, commands):
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for other in procs:
                other.kill()
            raise
        results.append(subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr))
    return results


# ---------------------------------------------------------------------------- two nodes, one machine
@pytest.mark.slow  # two two-rank jobs (this one and the one-node reference): ~31 s on an AVX2 EPYC
def test_two_nodes_over_loopback_train_like_one_node(pretrain_data, one_node_two_processes, tmp_path):
    """launch/multinode_deepspeed.sh in no-ssh mode, once per "node" (NODE_RANK 0 and 1), one
    process each, rendezvous on 127.0.0.1: the same losses as one node with two processes."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    out = tmp_path / "two-nodes"
    port = str(free_port())
    script = [MULTINODE] + train_overrides(pretrain_data, out, **STEPS, **NO_FINAL_SAVE)
    env = dict(HOSTFILE=str(hostfile), MASTER_ADDR="127.0.0.1", MASTER_PORT=port, MOSS_SKIP_PLAN="1")
    nodes = start_processes([(script, dict(env, NODE_RANK=str(rank))) for rank in (0, 1)])
    for rank, node in enumerate(nodes):
        assert node.returncode == 0, f"node {rank}:\n{node.stdout[-3000:]}\n{node.stderr[-3000:]}"
    launcher_log = nodes[1].stdout + nodes[1].stderr
    assert "nnodes=2" in launcher_log and "node_rank=1" in launcher_log  # really two launchers
    two, one = train_losses(out), train_losses(one_node_two_processes)
    assert sorted(two) == sorted(one) == [1, 2, 3, 4]
    assert_same_training(two, one, [1, 2, 3, 4])
    assert two[4]["loss"] < two[1]["loss"]


def test_multinode_launch_refuses_a_recipe_that_does_not_fit(tmp_path):
    """The launch script asks moss-plan first: 16B on one 80 GB GPU per node never starts."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# one GPU per node\nnode0 slots=1\n")
    result = run_cli(
        ["--config-name=moss16b_pretrain", "cluster=a100-80g-x1", f"run.output_dir={tmp_path}/run"],
        launcher=[MULTINODE],
        check=False,
        env=dict(HOSTFILE=str(hostfile), NODE_RANK="0"),
    )
    assert result.returncode == 1
    assert "1 node(s) x 1 GPUs" in result.stdout and "DOES NOT FIT" in result.stdout
    assert "moss-plan rejected the recipe" in result.stderr
    assert not (tmp_path / "run").exists()  # no training process started


# ---------------------------------------------------------------------------- failure and restart
def wandb_records(path: Path):
    """The records of a wandb transaction log (run-ID.wandb): a 7-byte header, then LevelDB-style
    32 KiB blocks of chunks (crc32 4, length 2, type 1: full, first, middle, last)."""
    from wandb.proto import wandb_internal_pb2

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if length == 0 and kind == 0:
            break
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def wandb_run(run_dir: Path) -> dict:
    """What one offline run directory recorded: the run (id, name, group, config) and its steps."""
    (log,) = run_dir.glob("run-*.wandb")
    found = {"steps": []}
    for record in wandb_records(log):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            found.update(id=record.run.run_id, name=record.run.display_name, group=record.run.run_group)
            found["config"] = {item.key: json.loads(item.value_json) for item in record.run.config.update}
        elif kind == "history":
            found["steps"].append(record.history.step.num)
    return found


@pytest.mark.slow  # a killed two-rank job and its resumption: ~22 s on an AVX2 EPYC
def test_rank_failure_ends_the_job_and_the_next_start_resumes(pretrain_data, one_node_two_processes, tmp_path):
    out = tmp_path / "run"
    recipe = train_overrides(
        pretrain_data,
        out,
        **STEPS,
        **{
            "checkpoint.every": 1,
            "logging.wandb": "offline",
            "run.name": "scaleout-restart",
            "logging.group": "scaleout",
        },
    )
    # 1. torchrun, two processes; rank 1 raises at step 2 (after step 1's checkpoint).
    torchrun = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()), "-m", "moss_train"]
    started = time.monotonic()
    failed = run_cli(recipe, launcher=torchrun, check=False, timeout=240, env={"MOSS_TEST_FAIL_AT_STEP": "1:2"})
    assert failed.returncode != 0
    assert "[moss-train] rank 1 failed: RuntimeError: MOSS_TEST_FAIL_AT_STEP=1:2" in failed.stderr
    assert time.monotonic() - started < 200  # ended, not hung until the collective timeout (1800 s)
    assert sorted(train_losses(out)) == [1]
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_00000001"

    # 2. The next start, as srun starts a requeued job: one process per task, SLURM's variables.
    slurm = dict(SLURM_NTASKS="2", SLURM_NTASKS_PER_NODE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    tasks = [
        (
            [str(BIN / "moss-train")] + recipe,
            dict(slurm, SLURM_PROCID=str(r), SLURM_LOCALID=str(r), WANDB_SILENT="false"),
        )
        for r in (0, 1)
    ]
    restarted = start_processes(tasks, timeout=240)
    for task in restarted:
        assert task.returncode == 0, task.stderr[-3000:]
    assert "resumed from" in restarted[0].stdout and "step_00000001 at step 1" in restarted[0].stdout
    resumed = train_losses(out)
    assert sorted(resumed) == [1, 2, 3, 4]
    assert_same_training(resumed, train_losses(one_node_two_processes), [2, 3, 4])

    # 3. wandb: one run across both starts (same id, name and group from the recipe), the fully
    # resolved config logged, the second part continuing at step 2, and the sync command printed.
    first, second = (wandb_run(d) for d in sorted((out / "wandb").glob("offline-run-*")))
    assert first["id"] == second["id"] == (out / "wandb_run_id").read_text().strip()
    assert (second["name"], second["group"]) == ("scaleout-restart", "scaleout")
    assert second["config"]["trainer"]["max_steps"] == 4 and second["config"]["data"]["root"] == str(pretrain_data)
    assert {"model", "deepspeed", "cluster", "checkpoint"} <= set(second["config"])
    assert first["steps"][0] == 1 and second["steps"][0] == 2
    assert f"wandb sync {out / 'wandb'}/offline-run-" in restarted[0].stdout + restarted[0].stderr


HANGING_PEER = """
import os, sys, time
import torch, torch.distributed as dist
from moss_train.distributed import init_distributed
init_distributed(timeout_s=float(sys.argv[1]))
if dist.get_rank() == 1:
    time.sleep(120)  # stuck outside the collective: a hung device, a dead file system
start = time.monotonic()
try:
    dist.all_reduce(torch.ones(1))
except Exception as error:
    print(f"collective failed after {time.monotonic() - start:.1f}s: {error}", flush=True)
    os._exit(3)
"""


def test_a_collective_waits_only_the_configured_timeout(tmp_path):
    """A rank that hangs (rather than dies) is caught by the collective timeout, which the CLI
    sets from cluster.collective_timeout_s: its peers fail after that long instead of forever."""
    script = tmp_path / "hang.py"
    script.write_text(HANGING_PEER)
    env = dict(WORLD_SIZE="2", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    command = [str(BIN / "python"), str(script), "3"]
    peer = subprocess.Popen(
        command, cwd=REPO, env=cli_env(**env, RANK="1"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        waiting = run_cli(command[1:], launcher=command[:1], check=False, env=dict(env, RANK="0"), timeout=120)
    finally:
        peer.kill()
        peer.wait()
    assert waiting.returncode == 3, waiting.stderr[-2000:]
    seconds = float(re.search(r"collective failed after ([\d.]+)s", waiting.stdout).group(1))
    assert 3 <= seconds < 20 and "Timed out" in waiting.stdout


# ---------------------------------------------------------------------------- sharded construction
MOSS16B_LAYERS = [
    "model=moss-16b",
    "model.n_layer=2",
    "trainer.precision=bf16",
    "trainer.micro_batch_size=1",
    "trainer.global_batch_size=2",
]


@pytest.mark.parametrize(
    "vocab",
    [
        pytest.param(["model.vocab_size=1024"], id="small-vocab", marks=pytest.mark.slow),  # ~26 s
        pytest.param([], id="moss-vocab", marks=pytest.mark.slow),
    ],
)
def test_zero3_builds_moss16b_layers_sharded(vocab, tmp_path):
    """Two ranks build two moss-16b layers (n_embd 6144, MLP 24576) under ZeRO-3 zero.Init, as
    the trainer does: each rank ends with half the parameters, and its resident memory never
    grows by the whole model's size (each layer is built, then sharded, one at a time)."""
    torchrun = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port())]
    run_cli(
        [str(REPO / "tests" / "zero3_probe.py"), str(tmp_path)] + MOSS16B_LAYERS + vocab, launcher=torchrun, timeout=600
    )
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    full = ranks[0]["full_bytes"]
    assert ranks[0]["dtype"] == "torch.bfloat16" and full == 2 * ranks[0]["num_params"]
    assert ranks[0]["num_params"] > 0.9e9  # two 453M-parameter layers, plus embeddings
    assert sum(r["shard_bytes"] for r in ranks) == pytest.approx(full, rel=1e-3)
    for r in ranks:
        assert r["local_full_tensors"] == 0  # every parameter is partitioned
        assert r["shard_bytes"] == pytest.approx(full / 2, rel=1e-3)
        assert r["rss_after"] - r["rss_before"] == pytest.approx(full / 2, rel=0.15)  # measured, not computed
        assert r["rss_peak"] - r["rss_before"] < 0.9 * full


# ---------------------------------------------------------------------------- no process left behind
def _wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


@pytest.mark.slow  # two torchrun jobs and a kill: ~25 s quiet
def test_killing_torchrun_stops_its_ranks_and_frees_the_run_directory(pretrain_data, tmp_path):
    """1. A torchrun job holds its run directory: a second job there refuses, naming rank 0's pid
    and host. 2. SIGKILL to torchrun's process group (ranks run in sessions of their own) left
    both ranks training to the end; now they stop. 3. The dead job's lock is taken over by the
    next job, which resumes, and metrics.jsonl holds each step once."""
    out = tmp_path / "run"
    recipe = train_overrides(
        pretrain_data, out, **{"trainer.max_steps": 400, "checkpoint.every": 1, "checkpoint.keep_last": 1}
    )
    command = [
        str(BIN / "torchrun"),
        "--nproc_per_node",
        "2",
        "--master_port",
        str(free_port()),
        "-m",
        "moss_train",
        *recipe,
    ]
    job = subprocess.Popen(
        command, cwd=REPO, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        _wait_for(
            lambda: (out / "checkpoints" / "latest").is_file() or job.poll() is not None, 240, "the first checkpoint"
        )
        assert job.poll() is None
        ranks = child_processes(job.pid)
        assert len(ranks) == 2
        holder = json.loads((out / ".moss-train.lock").read_text())
        assert holder["pid"] in ranks and holder["host"] == socket.gethostname()

        second = run_cli(recipe, check=False, timeout=120)
        assert second.returncode == 2, second.stderr[-2000:]
        assert (
            f"recipe error: run.output_dir: {out} is in use by another job "
            f"(pid {holder['pid']} on host {holder['host']}" in second.stderr
        )

        os.killpg(job.pid, signal.SIGKILL)
        job.wait()
        _wait_for(
            lambda: not any(process_running(pid) for pid in ranks),
            30,
            f"ranks {ranks} to stop after torchrun was killed",
        )
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()
    stopped_at = (out / "checkpoints" / "latest").read_text().strip()
    time.sleep(3)
    assert (out / "checkpoints" / "latest").read_text().strip() == stopped_at  # nobody trains on

    step = int(stopped_at.split("_")[-1])
    resumed = run_cli(train_overrides(pretrain_data, out, **{"trainer.max_steps": step + 1}), timeout=240)
    assert f"at step {step}" in resumed.stdout
    steps = [
        r["step"]
        for r in (json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines())
        if "loss" in r
    ]
    assert steps == list(range(1, step + 2))  # each step once, the killed run's extra steps dropped
