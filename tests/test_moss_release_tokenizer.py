"""MOSS release tokenizers without their code: a directory laid out as fnlp/moss-moon-003-sft ships
its tokenizer (byte-level BPE vocab.json + merges.txt, MOSS's added tokens in added_tokens.json,
tokenizer_config.json naming the custom MossTokenizer class and its tokenization_moss.py) reads
into a standard PreTrainedTokenizerFast whose ids equal a slow, GPT-2-style byte-level BPE
written here from the algorithm's description (what MossTokenizer is, run as transformers 4.25
ran it); it serves as data.tokenizer and in exports; and a vocabulary that differs from a
checkpoint's is a recipe error unless stage.allow_different_vocab says otherwise."""

from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path

import pytest
import regex
import transformers

from moss_train.tokenizer import HFTokenizer, is_moss_release_tokenizer, load_tokenizer, moss_release_tokenizer

from conftest import REPO

SHARED = Path(os.environ.get("MOSS_SHARED_DIR", REPO.parent / "shared"))
SAMPLE = SHARED / "data" / "moss-003-sft-sample" / "conversations.jsonl"
END_TOKENS = ["<eoh>", "<eot>", "<eoc>", "<eor>", "<eom>"]
ENDOFTEXT = "<|endoftext|>"
TEXTS = [
    "Hello, world! Don't we'll they're  two  spaces\tand a tab.\n\n\nThree newlines.",
    "def add(a, b):\n    return a + b  # 返回和\n",
    "人民日报 1998 年的新闻。 The end… 😀 naïve café",
    "<|Human|>: What is 23*17?<eoh>\n"
    '<|Inner Thoughts|>: use the calculator<eot>\n<|Commands|>: Calculate("23*17")<eoc>\n',
    "<|Results|>:\nCalculate(\"23*17\") => '391'\n<eor>\n<|MOSS|>: It is 391.<eom>\n",
    "a  <eoc>  b<eot><eom>\n \n<eoh>",
    f"{ENDOFTEXT}text {ENDOFTEXT} more",
    "   leading and trailing   ",
    "1234567 3.14159 1e-9 x=y+z; //comment",
    "",
]

# ----------------------------------------------------------------------------- the reference
PATTERN = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")


@lru_cache(maxsize=1)
def byte_alphabet() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map: printable Latin-1 bytes map to
    themselves, the other 68 bytes to 256, 257, ... in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + k) for k, b in enumerate(others)}}


class SlowByteLevelBPE:
    """The slow tokenizer: split off added tokens (longest first; the non-special ones strip the
    whitespace on both sides, as transformers 4.25 did), pre-tokenize with GPT-2's regex, map
    bytes to characters, and merge the lowest-ranked adjacent pair until none is in merges.txt."""

    def __init__(self, directory: Path, stripping: set[str], specials: set[str]):
        self.vocab = json.loads((directory / "vocab.json").read_text())
        self.vocab.update(json.loads((directory / "added_tokens.json").read_text()))
        merges = (directory / "merges.txt").read_text().split("\n")[1:-1]
        self.ranks = {tuple(m.split()): r for r, m in enumerate(merges)}
        self.stripping, self.whole = stripping, sorted(stripping | specials, key=len, reverse=True)

    def word(self, chars: str) -> list[str]:
        parts = list(chars)
        while len(parts) > 1:
            pairs = [(self.ranks.get((a, b), float("inf")), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
            rank, _ = min(pairs)
            if rank == float("inf"):
                break
            first, second = next((parts[i], parts[i + 1]) for r, i in pairs if r == rank)
            merged, i = [], 0
            while i < len(parts):  # every occurrence of that pair, left to right
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == (first, second):
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        return parts

    def split_added(self, text: str) -> list[str]:
        pieces = [text]
        for token in self.whole:
            pieces = [
                p for piece in pieces for p in (self._split(piece, token) if piece not in self.whole else [piece])
            ]
        for i, piece in enumerate(pieces):
            if piece in self.stripping:
                if i > 0 and pieces[i - 1] not in self.whole:
                    pieces[i - 1] = pieces[i - 1].rstrip()
                if i + 1 < len(pieces) and pieces[i + 1] not in self.whole:
                    pieces[i + 1] = pieces[i + 1].lstrip()
        return [p for p in pieces if p]

    @staticmethod
    def _split(text: str, token: str) -> list[str]:
        parts = text.split(token)
        return [x for k, part in enumerate(parts) for x in ([part] if k == 0 else [token, part])]

    def encode(self, text: str) -> list[int]:
        ids = []
        for piece in self.split_added(text):
            if piece in self.whole:
                ids.append(self.vocab[piece])
                continue
            for chunk in PATTERN.findall(piece):
                chars = "".join(byte_alphabet()[b] for b in chunk.encode("utf-8"))
                ids.extend(self.vocab[p] for p in self.word(chars))
        return ids


# ----------------------------------------------------------------------------- a release layout
MOSS_CODE = "from pathlib import Path\nPath({marker!r}).write_text('tokenization_moss.py ran')\n"


def write_release_tokenizer(directory: Path, corpus: list[str], marker: Path) -> Path:
    """A small byte-level BPE trained with the tokenizers library, saved as MOSS's release is."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=600, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tokenizer.train_from_iterator(corpus, trainer)
    directory.mkdir(parents=True)
    tokenizer.model.save(str(directory))  # vocab.json + merges.txt ("#version: 0.2" first)
    vocab = json.loads((directory / "vocab.json").read_text())
    vocab[ENDOFTEXT] = len(vocab)  # MOSS's <|endoftext|> is the last vocab.json entry
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (directory / "added_tokens.json").write_text(json.dumps({t: len(vocab) + i for i, t in enumerate(END_TOKENS)}))
    specials = {"bos_token": ENDOFTEXT, "eos_token": ENDOFTEXT, "unk_token": ENDOFTEXT}
    (directory / "special_tokens_map.json").write_text(json.dumps(specials))
    config = {
        **specials,
        "add_prefix_space": False,
        "model_max_length": 2048,
        "tokenizer_class": "MossTokenizer",
        "auto_map": {"AutoTokenizer": ["tokenization_moss.MossTokenizer", None]},
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    (directory / "tokenization_moss.py").write_text(MOSS_CODE.format(marker=str(marker)))
    return directory


def sample_texts() -> list[str]:
    if not SAMPLE.is_file():
        return []
    from moss_train import format as fmt
    from moss_train.data import parsing

    lines = SAMPLE.read_text(encoding="utf-8").splitlines()[::10]
    return [fmt.render(parsing.parse_record(json.loads(line)).dialogue) for line in lines if line.strip()]


@pytest.fixture(scope="module")
def release(tmp_path_factory, pretrain_data):
    root = tmp_path_factory.mktemp("moss-release")
    corpus = [
        json.loads(line)["text"]
        for f in sorted((pretrain_data / "corpus").glob("*.train.jsonl"))
        for line in f.read_text().splitlines()[:300]
    ]
    marker = root / "code-ran"
    directory = write_release_tokenizer(root / "moss-moon-003-sft", corpus + sample_texts()[:20], marker)
    return directory, marker, SlowByteLevelBPE(directory, stripping=set(END_TOKENS), specials={ENDOFTEXT})


def test_a_release_tokenizer_reads_without_its_code_and_gives_the_slow_tokenizers_ids(release):
    directory, marker, slow = release
    assert is_moss_release_tokenizer(directory)
    with pytest.raises(Exception):  # noqa: B017 -- whichever error transformers raises: the custom class is refused
        transformers.AutoTokenizer.from_pretrained(directory, trust_remote_code=False)
    fast = moss_release_tokenizer(directory)
    assert isinstance(fast, transformers.PreTrainedTokenizerFast) and not marker.exists()
    texts = TEXTS + sample_texts()
    for text in texts:
        assert fast(text, add_special_tokens=False)["input_ids"] == slow.encode(text), text[:80]
    assert len(texts) > 50 or not SAMPLE.is_file()
    # The end tokens are single ids after vocab.json's, and eat the whitespace around them.
    vocab = json.loads((directory / "vocab.json").read_text())
    assert [fast.convert_tokens_to_ids(t) for t in END_TOKENS] == list(range(len(vocab), len(vocab) + 5))
    assert (
        fast("x <eoh>\ny", add_special_tokens=False)["input_ids"]
        == fast("x<eoh>y", add_special_tokens=False)["input_ids"]
    )
    assert fast.eos_token == fast.bos_token == ENDOFTEXT and fast.eos_token_id == len(vocab) - 1
    assert (
        fast.decode(fast("def f():\n    return 1", add_special_tokens=False)["input_ids"]) == "def f():\n    return 1"
    )


def test_a_release_tokenizer_serves_as_data_tokenizer_and_in_exports(release, tmp_path):
    directory, marker, slow = release
    tokenizer = load_tokenizer(directory)  # what data.tokenizer loads
    assert isinstance(tokenizer, HFTokenizer) and tokenizer.vocab_size == len(slow.vocab)
    assert tokenizer.encode_batch(TEXTS) == [slow.encode(t) for t in TEXTS]
    assert tokenizer.special_ids["<eom>"] == slow.vocab["<eom>"]
    # An export writes a standard tokenizer.json: AutoTokenizer loads it, no code, the same ids.
    from moss_train.checkpoint.chat_template import build_chat_template

    out = tokenizer.save_pretrained(tmp_path / "export", extra_config={"chat_template": build_chat_template()})
    exported = transformers.AutoTokenizer.from_pretrained(out, trust_remote_code=False)
    assert [exported(t, add_special_tokens=False)["input_ids"] for t in TEXTS] == [slow.encode(t) for t in TEXTS]
    assert not marker.exists() and not is_moss_release_tokenizer(out) and load_tokenizer(out).hash != tokenizer.hash
    rendered = exported.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert rendered.endswith("<|Human|>: hi<eoh>\n<|Inner Thoughts|>:")


# ----------------------------------------------------------------------------- stage.init_from
def init_model(checkpoint: Path, tokenizer_dir: Path, capsys, **stage):
    """stage.init_from as the trainer does it (adopt the config, build, load) in one process;
    returns the model and what was printed."""
    import torch

    from moss_train.checkpoint.init import adopt_model_config, load_initial_weights
    from moss_train.config import MossTrainConfig, recipe_tokenizer
    from moss_train.distributed import DistInfo
    from moss_train.stages import lm

    single = DistInfo(rank=0, world_size=1, local_rank=0, local_world_size=1, device=torch.device("cpu"))
    cfg = MossTrainConfig()
    cfg.stage.init_from = str(checkpoint)
    for key, value in stage.items():
        setattr(cfg.stage, key, value)
    cfg.data.tokenizer, cfg.data.seq_len = str(tokenizer_dir), 64
    tokenizer = recipe_tokenizer(cfg)
    cfg = adopt_model_config(cfg, tokenizer, single)
    model = lm.build_causal_lm(cfg, tokenizer)
    load_initial_weights(model, cfg, tokenizer, single)
    return model, capsys.readouterr().out


def test_init_from_a_release_compares_vocabularies_and_a_different_one_is_a_recipe_error(
    release, pretrain_data, tmp_path, capsys
):
    from test_export import random_hf_codegen

    from moss_train.errors import ConfigError

    directory, marker, slow = release
    checkpoint = tmp_path / "moss-release"
    random_hf_codegen(
        len(slow.vocab), seed=3, n_positions=64, n_ctx=64, n_embd=32, n_layer=1, n_head=4, rotary_dim=4
    ).save_pretrained(checkpoint)
    for f in directory.iterdir():  # the release's tokenizer files beside its weights
        (checkpoint / f.name).write_bytes(f.read_bytes())
    # The release's own tokenizer as data.tokenizer: the vocabularies are compared piece by piece.
    model, out = init_model(checkpoint, directory, capsys)
    assert "compared by size only" not in out and "differ" not in out and not marker.exists()
    assert f"loaded {len(list(model.parameters()))} tensors" in out
    # Another tokenizer (the sentencepiece one) at the same ids: a recipe error naming the key...
    with pytest.raises(
        ConfigError,
        match=r"data.tokenizer: the run's tokenizer and the checkpoint's differ at .*stage.allow_different_vocab",
    ):
        init_model(checkpoint, pretrain_data / "tokenizer", capsys)
    # ...unless the recipe allows it, loudly.
    _, out = init_model(checkpoint, pretrain_data / "tokenizer", capsys, allow_different_vocab=True)
    assert "WARNING: the run's tokenizer and the checkpoint's differ" in out
