"""Data: prepare (inputs, split, reuse, bad input), the memory-mapped reader and the batch iterators."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch

from leanlm.data import (
    BatchIterator,
    TokenDataset,
    load_tokenizer_ref,
    prepare,
    split_documents,
    stdlib_files,
    token_dtype,
    val_batches,
)
from leanlm.errors import LeanLMError
from leanlm.hf import smollm2_gguf
from leanlm.tokenizer import Tokenizer

VOCAB = 300


def write_corpus(root: Path, n: int = 12) -> dict[str, str]:
    """`n` small, distinct documents under root (one in a subdirectory); returns {relative path: text}."""
    docs = {}
    for i in range(n):
        rel = f"sub/doc{i:02d}.txt" if i == 0 else f"doc{i:02d}.txt"
        docs[rel] = "".join(f"def func_{i}_{j}(x):\n    return x * {i + j} + {j}\n\n" for j in range(12))
    for rel, text in docs.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return docs


def prep(inputs: list, out: Path, **kw) -> dict:
    return prepare([str(i) for i in inputs], out, vocab_size=kw.pop("vocab_size", VOCAB), progress=False, **kw)


def documents(out: Path) -> list[str]:
    """The decoded documents of both splits, split at the end-of-document token (which ends every document)."""
    tok, m = Tokenizer.load(out), TokenDataset(out).manifest
    texts = []
    for split in ("train", "val"):
        ids = TokenDataset(out, split).tokens.tolist()
        assert ids[-1] == m["eos_id"]
        texts += tok.decode(ids, skip_special=False).split(m["eos_token"])[:-1]
    return texts


def bins(out: Path) -> tuple[bytes, bytes]:
    return (out / "train.bin").read_bytes(), (out / "val.bin").read_bytes()


@pytest.fixture
def corpus(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    return tmp_path / "corpus", write_corpus(tmp_path / "corpus")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    write_corpus(root / "corpus", n=20)
    prep([root / "corpus"], root / "out")
    return root / "out"


# ---------------------------------------------------------------------------------------------------------------------
# prepare


def test_prepare_directory(corpus, tmp_path):
    root, docs = corpus
    m = prep([root], tmp_path / "out")
    assert not m["reused"] and m["documents"] == len(docs) and m["skipped"] == 0
    assert m["train_documents"] >= 1 and m["val_documents"] >= 1
    assert m["dtype"] == "uint16" and np.dtype(m["dtype"]).itemsize == 2
    assert m["bytes"] == sum(len(t.encode()) for t in docs.values())
    assert m["sources"][0]["input"] == str(root) and m["sources"][0]["files"] == len(docs)
    tok = Tokenizer.load(tmp_path / "out")
    assert tok.eos_token == tok.bos_token == "<|endoftext|>" and tok.eos_id == m["eos_id"]
    assert tok.vocab_size == m["vocab_size"] <= VOCAB  # a tiny corpus runs out of merges (with a warning)
    for split in ("train", "val"):
        ds = TokenDataset(tmp_path / "out", split)
        assert ds.tokens.dtype == np.uint16 and len(ds) == m[f"{split}_tokens"] > 0
        assert ds.vocab_size == m["vocab_size"] and ds.manifest["fingerprint"] == m["fingerprint"]
    # every document comes back exactly once, each followed by the end-of-document token
    assert sorted(documents(tmp_path / "out")) == sorted(docs.values())


def test_prepare_from_files_and_globs(corpus, tmp_path):
    root, docs = corpus
    by_dir = prep([root], tmp_path / "dir")
    # a glob's keys are relative to its wildcard-free prefix, like a directory's; same files in the same order
    # (a directory lists "sub/doc00.txt" after "doc*.txt") give the same token arrays
    by_glob = prep([root / "*.txt", root / "s*" / "*.txt"], tmp_path / "glob")
    assert by_glob["documents"] == len(docs) and [s["files"] for s in by_glob["sources"]] == [len(docs) - 1, 1]
    files = sorted(root.glob("*.txt")) + [root / "sub" / "doc00.txt"]
    by_files = prep(files, tmp_path / "files")
    assert by_files["documents"] == len(docs)
    assert bins(tmp_path / "dir") == bins(tmp_path / "glob")
    assert by_dir["fingerprint"] != by_glob["fingerprint"]  # the inputs are part of it
    # a file named twice is one document
    assert prep([root, root / "doc01.txt"], tmp_path / "twice")["documents"] == len(docs)


def test_split_is_deterministic_and_reused(corpus, tmp_path):
    root, _ = corpus
    a, b = prep([root], tmp_path / "a"), prep([root], tmp_path / "b")
    assert bins(tmp_path / "a") == bins(tmp_path / "b")
    assert a["tokenizer_sha256"] == b["tokenizer_sha256"] and a["fingerprint"] == b["fingerprint"]
    again = prep([root], tmp_path / "a")
    assert again["reused"] and again["fingerprint"] == a["fingerprint"]
    # another option or a changed file redoes the work
    assert not prep([root], tmp_path / "a", seed=1)["reused"]
    (root / "doc03.txt").write_text("changed\n" * 50)
    redone = prep([root], tmp_path / "a", seed=1)
    assert not redone["reused"] and "changed\n" * 50 in documents(tmp_path / "a")


def test_split_documents_fraction_and_guarantee():
    keys = [f"dir/file{i}.py" for i in range(4000)]
    is_val = split_documents(keys, 0.05)
    assert is_val == split_documents(keys, 0.05) and is_val != split_documents(keys, 0.05, seed=1)
    assert 0.04 < sum(is_val) / len(keys) < 0.06
    assert sorted(split_documents(["a", "b"], 0.01)) == [False, True]
    assert sorted(split_documents(["a", "b"], 0.99)) == [False, True]
    assert split_documents(["a"], 0.5) in ([False], [True])


def test_single_document_splits_at_the_tail(corpus, tmp_path):
    root, docs = corpus
    m = prep([root / "doc01.txt"], tmp_path / "out", val_fraction=0.1)
    assert m["documents"] == 1 and m["split"].startswith("tail")
    train, val = (TokenDataset(tmp_path / "out", s).tokens.tolist() for s in ("train", "val"))
    assert val[-1] == m["eos_id"] and m["eos_id"] not in train and abs(len(val) - 0.1 * (len(train) + len(val))) <= 1
    assert Tokenizer.load(tmp_path / "out").decode(train + val) == docs["doc01.txt"]


def test_non_utf8_and_empty_files(corpus, tmp_path, capsys):
    root, docs = corpus
    (root / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    (root / "blank.txt").write_text(" \n\t\n")
    m = prep([root], tmp_path / "out")
    assert m["documents"] == len(docs) and m["skipped"] == 1 and m["empty_files"] == 1
    assert m["skipped_paths"] == [str(root / "latin1.txt")]
    err = [line for line in capsys.readouterr().err.splitlines() if "latin1.txt" in line]
    assert len(err) == 1 and err[0].startswith("warning:") and "UTF-8" in err[0]


def test_empty_corpus(tmp_path):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "a.txt").write_text("   \n\n")
    (tmp_path / "c" / "b.bin").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(LeanLMError, match="corpus is empty"):
        prep([tmp_path / "c"], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_bad_inputs(corpus, tmp_path):
    root, _ = corpus
    with pytest.raises(LeanLMError, match="nope.txt: no such file"):
        prep([root, tmp_path / "nope.txt"], tmp_path / "out")
    with pytest.raises(LeanLMError, match=r"\*\.md: the pattern matches no files"):
        prep([root / "*.md"], tmp_path / "out")
    for bad in (100, 256, 2**32):
        with pytest.raises(LeanLMError, match="vocab_size"):
            prep([root], tmp_path / "out", vocab_size=bad)
    with pytest.raises(LeanLMError, match="val_fraction"):
        prep([root], tmp_path / "out", val_fraction=0.0)
    for ref, msg in (
        ("no-such-tokenizer", "unknown tokenizer"),
        ("tiny", "no published weights"),
        (str(root), "no tokenizer.json"),
        (str(root / "doc01.txt"), "not a valid tokenizer.json"),
    ):
        with pytest.raises(LeanLMError, match=msg):
            prep([root], tmp_path / "out", tokenizer=ref)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(LeanLMError, match="refusing to overwrite"):
        prep([root], tmp_path / "busy")
    assert not (tmp_path / "out").exists()


def test_reuse_a_tokenizer(corpus, tmp_path):
    root, _ = corpus
    first = prep([root], tmp_path / "a")
    for ref in (tmp_path / "a" / "tokenizer.json", tmp_path / "a"):
        m = prep([root], tmp_path / "b", tokenizer=str(ref), vocab_size=8192)  # vocab_size is the tokenizer's
        assert not m["reused"] and m["tokenizer_sha256"] == first["tokenizer_sha256"]
        assert m["vocab_size"] == first["vocab_size"] and m["eos_id"] == first["eos_id"]
        assert bins(tmp_path / "a") == bins(tmp_path / "b")
        assert prep([root], tmp_path / "b", tokenizer=str(ref))["reused"]


def test_reuse_a_tokenizer_without_eos(corpus, tmp_path):
    """A bare tokenizer.json has no config: the document separator is its <|endoftext|>, recorded as eos."""
    root, _ = corpus
    prep([root], tmp_path / "a")
    (tmp_path / "bare").mkdir()
    (tmp_path / "bare" / "tokenizer.json").write_bytes((tmp_path / "a" / "tokenizer.json").read_bytes())
    assert load_tokenizer_ref(str(tmp_path / "bare")).eos_id is None
    m = prep([root], tmp_path / "b", tokenizer=str(tmp_path / "bare" / "tokenizer.json"))
    assert m["eos_token"] == "<|endoftext|>" and Tokenizer.load(tmp_path / "b").eos_id == m["eos_id"]


def test_token_dtype():
    assert token_dtype(65535) == np.uint16 and token_dtype(65536) == np.uint32 and token_dtype(200_000) == np.uint32


def test_dataset_errors(prepared, tmp_path):
    with pytest.raises(LeanLMError, match="not a prepared data directory"):
        TokenDataset(tmp_path)
    with pytest.raises(LeanLMError, match="split"):
        TokenDataset(prepared, "test")
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in prepared.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    (broken / "train.bin").write_bytes((prepared / "train.bin").read_bytes()[:-2])
    with pytest.raises(LeanLMError, match="truncated"):
        TokenDataset(broken, "train")
    # an incomplete directory is prepared again rather than reused
    corpus = prepared.parent / "corpus"
    assert prep([corpus], prepared)["reused"] and not prep([corpus], broken)["reused"]
    assert len(TokenDataset(broken, "train")) == len(TokenDataset(prepared, "train"))


def test_stdlib_discovery():
    files = stdlib_files()
    root = Path(sysconfig.get_paths()["stdlib"])
    rel = [f.relative_to(root) for f in files]
    # Python 3.11 has ~730 non-test modules (~12 MB); counting the test suites it would be ~1800
    assert len(files) > 500 and all(f.suffix == ".py" for f in files)
    assert Path("os.py") in rel and Path("json/__init__.py") in rel and Path("idlelib/editor.py") in rel
    excluded = {"test", "tests", "idle_test", "site-packages"}
    assert not any(excluded & set(r.parts[:-1]) for r in rel)


# ---------------------------------------------------------------------------------------------------------------------
# batches


def test_batch_iterator_windows_and_determinism(prepared):
    ds = TokenDataset(prepared, "train")
    a, b = BatchIterator(ds, 4, 16, seed=3), BatchIterator(ds, 4, 16, seed=3)
    tokens = torch.from_numpy(ds.tokens.astype(np.int64))
    for _ in range(5):
        (x, y), (x2, y2) = next(a), next(b)
        assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == torch.int64
        assert torch.equal(x, x2) and torch.equal(y, y2) and torch.equal(x[:, 1:], y[:, :-1])
        for row_x, row_y in zip(x, y):  # each row is a real window of the split
            i = next(
                i
                for i in range(len(tokens) - 16)
                if torch.equal(tokens[i : i + 16], row_x) and torch.equal(tokens[i + 1 : i + 17], row_y)
            )
            assert i >= 0
    assert not torch.equal(next(BatchIterator(ds, 4, 16, seed=4))[0], next(BatchIterator(ds, 4, 16, seed=3))[0])


def test_batch_iterator_resume(prepared, tmp_path):
    ds = TokenDataset(prepared, "train")
    it = BatchIterator(ds, 3, 8, seed=0)
    for _ in range(3):
        next(it)
    torch.save(it.state_dict(), tmp_path / "state.pt")  # as a training checkpoint would store it
    expected = [next(it) for _ in range(2)]
    fresh = BatchIterator(ds, 3, 8, seed=0)
    fresh.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    assert fresh.step == 3
    for (x, y), (x2, y2) in zip(expected, [next(fresh) for _ in range(2)]):
        assert torch.equal(x, x2) and torch.equal(y, y2)
    with pytest.raises(LeanLMError, match="not a BatchIterator state"):
        fresh.load_state_dict({"step": 1})


def test_batch_iterator_ranks_share_the_global_batch(prepared):
    ds = TokenDataset(prepared, "train")
    single = BatchIterator(ds, 4, 8, seed=5)
    ranks = [BatchIterator(ds, 2, 8, seed=5, rank=r, world_size=2) for r in range(2)]
    for _ in range(4):
        x, y = next(single)
        parts = [next(r) for r in ranks]
        assert torch.equal(x, torch.cat([p[0] for p in parts])) and torch.equal(y, torch.cat([p[1] for p in parts]))
    with pytest.raises(LeanLMError, match="rank"):
        BatchIterator(ds, 2, 8, rank=2, world_size=2)


def test_too_short_split(prepared):
    ds = TokenDataset(prepared, "val")
    with pytest.raises(LeanLMError, match="fewer than seq_len"):
        BatchIterator(ds, 1, len(ds))
    with pytest.raises(LeanLMError, match="fewer than seq_len"):
        val_batches(ds, 1, len(ds))
    x, y = next(BatchIterator(ds, 2, len(ds) - 1))
    assert torch.equal(x[0], x[1])  # only one window fits


def test_val_batches(prepared):
    ds = TokenDataset(prepared, "val")
    tokens = torch.from_numpy(ds.tokens.astype(np.int64))
    T = 8
    n_windows = (len(ds) - 1) // T
    batches = list(val_batches(ds, 3, T))
    assert [len(x) for x, _ in batches] == [3] * (n_windows // 3) + ([n_windows % 3] if n_windows % 3 else [])
    xs, ys = torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches])
    assert torch.equal(xs.flatten(), tokens[: n_windows * T]) and torch.equal(
        ys.flatten(), tokens[1 : n_windows * T + 1]
    )
    limited = list(val_batches(ds, 3, T, max_batches=2))
    assert len(limited) == 2 and all(torch.equal(a[0], b[0]) for a, b in zip(limited, batches))


# ---------------------------------------------------------------------------------------------------------------------
# slow: the real corpora


@pytest.mark.slow
def test_prepare_stdlib(tmp_path):
    m = prepare(["stdlib"], tmp_path / "out", vocab_size=8192, progress=False)
    assert m["documents"] > 500 and m["vocab_size"] == 8192 and m["dtype"] == "uint16" and m["skipped"] == 0
    assert m["train_tokens"] > 1_000_000 and 0.02 < m["val_tokens"] / (m["train_tokens"] + m["val_tokens"]) < 0.1
    assert prepare(["stdlib"], tmp_path / "out", vocab_size=8192, progress=False)["reused"]
    x, y = next(BatchIterator(TokenDataset(tmp_path / "out"), 2, 256, seed=0))
    assert x.shape == (2, 256) and int(x.max()) < 8192


@pytest.mark.slow
def test_prepare_with_smollm2_tokenizer(corpus, tmp_path):
    try:
        smollm2_gguf()
    except LeanLMError as e:
        pytest.skip(str(e))
    root, docs = corpus
    m = prepare([str(root)], tmp_path / "out", tokenizer="smollm2-135m", progress=False)
    assert m["vocab_size"] == 49152 and m["dtype"] == "uint16"
    # documents end with <|endoftext|>, not with the chat end-of-turn token the tokenizer calls eos
    assert m["eos_token"] == "<|endoftext|>" and m["eos_id"] == 0 and Tokenizer.load(tmp_path / "out").eos_id == 2
    assert sorted(documents(tmp_path / "out")) == sorted(docs.values())
