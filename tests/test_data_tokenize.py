"""`moss-data tokenize`: deterministic, resumable after SIGKILL, split over nodes and merged."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from data_pipelines.clean import Cleaner, CleaningConfig
from data_pipelines.tokenize_corpus import TokenizeSettings, merge_manifests, tokenize_corpus
from moss_train.data.shards import TokenShard

from conftest import BIN, REPO

N_FILES = 6


@pytest.fixture(scope="module")
def corpus_files(pretrain_data, tmp_path_factory) -> list[Path]:
    """N_FILES jsonl files (~0.5 MB each) of real EN / ZH / code text; file 1 repeats one
    document of file 0 (a duplicate across files)."""
    docs = []
    for source in ("en", "zh", "code"):
        lines = (pretrain_data / "corpus" / f"{source}.train.jsonl").read_text(encoding="utf-8").splitlines()
        docs += [json.loads(line)["text"] for line in lines]
    clean = Cleaner(CleaningConfig.for_lang("any"))
    docs = [t for t in dict.fromkeys(docs) if clean(t)[1:] == (None, [])]  # distinct, unchanged by cleaning
    out = tmp_path_factory.mktemp("tokenize-in")
    paths = []
    per_file = len(docs) // N_FILES
    for k in range(N_FILES):
        chunk = docs[k * per_file : (k + 1) * per_file]
        if k == 1:
            chunk = chunk + [docs[0]]
        path = out / f"shard{k}.jsonl"
        path.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in chunk), encoding="utf-8")
        paths.append(path)
    return paths


def _settings() -> TokenizeSettings:
    return TokenizeSettings("mix", cleaning=CleaningConfig.for_lang("any"))


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


PART_BYTES = 1  # every input file is a part of its own


@pytest.fixture(scope="module")
def reference(pretrain_data, corpus_files, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tokenize-ref")
    tokenize_corpus(
        [str(p) for p in corpus_files], pretrain_data / "tokenizer", out, _settings(), workers=2, part_bytes=PART_BYTES
    )
    return out


def test_output_is_independent_of_worker_count(pretrain_data, corpus_files, reference, tmp_path):
    summary = tokenize_corpus(
        [str(p) for p in corpus_files],
        pretrain_data / "tokenizer",
        tmp_path,
        _settings(),
        workers=1,
        part_bytes=PART_BYTES,
        batch_bytes=16384,  # many small batches: another batching, same bytes
    )
    assert summary["parts"] == N_FILES and summary["rejected"] == {"duplicate": 1}
    assert summary["records_in"] == summary["docs"] + 1
    assert _files(tmp_path) == _files(reference)


def test_killed_run_resumes_to_byte_identical_output(pretrain_data, corpus_files, reference, tmp_path):
    """A real SIGKILL mid-run; the restarted run reuses finished parts and redoes the rest."""
    out = tmp_path / "out"
    command = [
        str(BIN / "moss-data"),
        "-q",
        "tokenize",
        "--input",
        *map(str, corpus_files),
        "--tokenizer",
        str(pretrain_data / "tokenizer"),
        "--out",
        str(out),
        "--source",
        "mix",
        "--lang",
        "any",
        "--part-mb",
        str(PART_BYTES / 2**20),
        "--workers",
        "2",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True
    )
    deadline = time.time() + 120
    while not (out / "part-00001.json").exists():
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, "tokenize made no progress"
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)  # the run and its worker processes, mid-way
    proc.wait()
    finished = sorted(p.name for p in out.glob("part-*.json"))
    assert not (out / "manifest.json").exists() and len(finished) < N_FILES, "the run finished before the kill"

    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout)
    assert summary["parts_skipped"] == len(finished) >= 2
    assert _files(out) == _files(reference)  # every shard, rejects, hashes file and the manifest


def test_shards_over_nodes_then_merge(pretrain_data, corpus_files, reference, tmp_path):
    """--num-shards 2: node k takes parts k, k+2, ...; the merge covers all; duplicates between
    nodes (file 1 repeats a document of file 0) are kept there and counted by the merge."""
    for index in (1, 0):
        summary = tokenize_corpus(
            [str(p) for p in corpus_files],
            pretrain_data / "tokenizer",
            tmp_path,
            _settings(),
            workers=1,
            num_shards=2,
            shard_index=index,
            part_bytes=PART_BYTES,
        )
        assert summary["parts"] == N_FILES // 2
        assert (tmp_path / f"manifest.shard-{index:05d}-of-00002.json").is_file()
    shard0 = json.loads((tmp_path / "manifest.shard-00000-of-00002.json").read_text())
    assert [p["name"] for p in shard0["parts"]] == ["part-00000", "part-00002", "part-00004"]
    with pytest.raises(ValueError, match="do not cover"):
        merge_manifests([tmp_path / "manifest.shard-00000-of-00002.json"])
    merged = merge_manifests([tmp_path])
    assert merged["cross_shard_duplicates"] == 1
    ref = json.loads((reference / "manifest.json").read_text())
    assert [p["name"] for p in merged["parts"]] == [p["name"] for p in ref["parts"]]
    assert merged["totals"]["docs"] == ref["totals"]["docs"] + 1  # the cross-node duplicate
    assert json.loads((tmp_path / "manifest.json").read_text()) == merged
    ref_files = _files(reference)
    for name, data in _files(tmp_path).items():
        if name.startswith("part-") and not name.startswith("part-00001"):
            assert data == ref_files[name], name
    # A recipe can point at the folder: its manifest lists every part.
    from moss_train.data.token_datasets import resolve_shard_prefixes

    prefixes = resolve_shard_prefixes(str(tmp_path.parent), [tmp_path.name], "data.train_shards")
    assert [Path(p).name for p in prefixes] == [f"part-{k:05d}" for k in range(N_FILES)]
    assert sum(TokenShard(p).n_docs for p in prefixes) == merged["totals"]["docs"]


def test_unfinished_dataset_folder_is_a_clear_recipe_error(tmp_path):
    from moss_train.data.token_datasets import resolve_shard_prefixes
    from moss_train.errors import ConfigError

    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "manifest.shard-00000-of-00002.json").write_text("{}")
    with pytest.raises(ConfigError, match="merge-manifests"):
        resolve_shard_prefixes(str(tmp_path), ["ds"], "data.sources.en.train_shards")
    with pytest.raises(ConfigError, match="no token dataset or shard matches"):
        resolve_shard_prefixes(str(tmp_path), ["nothing*"], "data.train_shards")
