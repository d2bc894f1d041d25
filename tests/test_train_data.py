"""Tests of :mod:`qdelta_jax.train.data`: batch structure of MQAR / needle / packed text,
determinism, and resumable iteration. NumPy only (no compilation): fast."""

from __future__ import annotations

import re

import numpy as np
import pytest

from qdelta_jax.train import data as D


def check_common(b, B, T):
    assert set(b) >= {"inputs", "targets", "mask"}
    assert b["inputs"].shape == b["targets"].shape == b["mask"].shape == (B, T)
    assert b["inputs"].dtype == b["targets"].dtype == np.int32
    assert b["mask"].dtype == np.float32
    # targets are the inputs shifted by one
    np.testing.assert_array_equal(b["inputs"][:, 1:], b["targets"][:, :-1])


# ---------------------------------------------------------------------------------------- MQAR


@pytest.mark.parametrize("P,T,V", [(4, 64, 64), (8, 31, 256), (16, 128, 8192)])
def test_mqar_structure(P, T, V):
    src = D.MQAR(batch_size=6, seq_len=T, num_pairs=P, vocab_size=V, seed=3)
    b = src.batch(5)
    check_common(b, 6, T)
    noise, keys_r, values_r = src.layout()
    for row in range(6):
        inp, tgt, m = b["inputs"][row], b["targets"][row], b["mask"][row]
        keys, values = inp[0 : 2 * P : 2], inp[1 : 2 * P : 2]
        assert len(set(keys.tolist())) == P, "keys must be distinct"
        assert all(k in keys_r for k in keys) and all(v in values_r for v in values)
        pair = dict(zip(keys.tolist(), values.tolist(), strict=True))
        pos = np.flatnonzero(m)
        assert len(pos) == P and np.all(pos >= 2 * P), "one query per key, after the pairs"
        assert sorted(inp[pos].tolist()) == sorted(keys.tolist()), "every key queried once"
        for p in pos:
            assert tgt[p] == pair[int(inp[p])], "the target of a query is its key's value"
        # gaps hold noise tokens only
        rest = np.ones(T, bool)
        rest[: 2 * P] = False
        rest[pos] = False
        rest[np.minimum(pos + 1, T - 1)] = False
        assert all(t in noise for t in inp[rest])
    assert np.all((b["inputs"] >= 0) & (b["inputs"] < V))


def test_mqar_keys_in_random_order():
    src = D.MQAR(batch_size=64, seq_len=64, num_pairs=8, vocab_size=256, seed=0)
    b = src.batch(0)
    same = 0
    for row in range(64):
        keys = b["inputs"][row, 0:16:2].tolist()
        queried = b["inputs"][row][b["mask"][row] > 0].tolist()
        same += queried == keys
    assert same < 4


def test_mqar_bad_sizes():
    with pytest.raises(D.DataError, match="--seq-len"):
        D.MQAR(batch_size=2, seq_len=10, num_pairs=8, vocab_size=256)
    with pytest.raises(D.DataError, match="--num-pairs"):
        D.MQAR(batch_size=2, seq_len=512, num_pairs=100, vocab_size=64)


# ---------------------------------------------------------------------------------------- NIAH


@pytest.mark.parametrize("variant", D.NIAH_VARIANTS)
@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0, None])
def test_niah_structure(variant, depth):
    T = 400
    src = D.NIAH(batch_size=3, seq_len=T, variant=variant, depth=depth, seed=1)
    b = src.batch(2)
    check_common(b, 3, T)
    for row in range(3):
        text = bytes(b["inputs"][row].astype(np.uint8)).decode() + chr(b["targets"][row, -1])
        m = re.search(r"The special magic number for (\w+) is ([\w-]+)\. ", text)
        assert m, text
        key, value = m.group(1), m.group(2)
        assert text.endswith(f"What is the special magic number for {key}? The special magic "
                             f"number for {key} is {value}")
        answer = bytes(b["targets"][row][b["mask"][row] > 0].astype(np.uint8)).decode()
        assert answer == value
        assert int(b["mask"][row].sum()) == len(value)
        if variant == "passkey":
            assert len(value) == 5 and "The grass is green." in text
        elif variant == "number":
            assert len(value) == 7 and "The grass is green." not in text
        else:
            assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}",
                                value)
        if depth is not None:
            hay_len = T - len(f" What is the special magic number for {key}? The special magic "
                              f"number for {key} is ") - len(value)
            where = m.start() / hay_len
            assert abs(where - depth) < 0.3, (where, depth)
            if depth == 0.0:
                assert m.start() == 0


def test_niah_too_short():
    with pytest.raises(D.DataError, match="--seq-len"):
        D.NIAH(batch_size=1, seq_len=50, variant="uuid")


# ---------------------------------------------------------------------------------------- text


@pytest.fixture
def text_dir(tmp_path):
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    docs = []
    for i in range(12):
        n = int(rng.integers(5, 90))
        s = "".join(chr(c) for c in rng.integers(97, 123, size=n)) + f" doc{i}\n"
        docs.append(s)
        (root / ("sub" if i % 2 else ".") / f"f{i:02d}.txt").write_text(s)
    (root / "binary.dat").write_bytes(b"\x00\x01\x02")  # skipped: not text
    (root / "__pycache__").mkdir()
    (root / "__pycache__" / "x.txt").write_text("skipped")
    return root


def check_packing(b, T, eos):
    inp, cu, mask = b["inputs"], b["cu_seqlens"], b["mask"]
    assert cu.dtype == np.int32 and cu.shape[0] == inp.shape[0]
    for row in range(inp.shape[0]):
        c = cu[row]
        assert c[0] == 0 and c[-1] == T and np.all(np.diff(c) >= 0)
        # a document starts exactly where the previous token is the end-of-document token
        starts = {int(o) for o in c if 0 < o < T}
        expect = {o for o in range(1, T) if inp[row, o - 1] == eos}
        assert starts == expect
        # no target crosses a document boundary
        for o in range(T):
            if inp[row, o] == eos:
                assert mask[row, o] == 0
            elif o + 1 < T and inp[row, o + 1] != eos or o == T - 1:
                assert mask[row, o] == 1


def test_text_folder_packing(text_dir):
    tokens, eos, vocab = D.load_tokens(text_dir)
    assert eos == D.BYTE_EOS and vocab == D.BYTE_VOCAB
    assert int((tokens == eos).sum()) == 12  # binary and __pycache__ skipped
    src = D.TextData(tokens, eos, batch_size=4, seq_len=24, seed=0)
    seen = 0
    for i in range(5):
        b = src.batch(i)
        check_common(b, 4, 24)
        check_packing(b, 24, eos)
        seen += int((b["cu_seqlens"][:, 1:-1] > 0).sum())
    assert seen > 0, "some rows must hold document boundaries"


def test_text_memmap_files(tmp_path):
    rng = np.random.default_rng(1)
    eos = 7
    toks = rng.integers(8, 1000, size=4000).astype(np.uint16)
    toks[rng.choice(4000, 60, replace=False)] = eos
    np.save(tmp_path / "t.npy", toks)
    toks.tofile(tmp_path / "t.bin")
    toks.astype(np.uint32).tofile(tmp_path / "t.u32.bin")
    for name in ("t.npy", "t.bin", "t.u32.bin"):
        tokens, e, vocab = D.load_tokens(tmp_path / name, eos_id=eos)
        assert isinstance(tokens, np.memmap) or tokens.base is not None
        np.testing.assert_array_equal(np.asarray(tokens), toks)
        assert vocab == int(toks.max()) + 1
        src = D.TextData(tokens, e, batch_size=8, seq_len=32)
        b = src.batch(3)
        check_packing(b, 32, eos)


def test_text_splits_and_shuffle(tmp_path):
    toks = np.random.default_rng(2).integers(1, 60_000, size=10_000).astype(np.uint16)
    np.save(tmp_path / "t.npy", toks)
    tokens, e, _ = D.load_tokens(tmp_path / "t.npy")
    tr = D.TextData(tokens, e, batch_size=4, seq_len=16, split="train", seed=0)
    ev = D.TextData(tokens, e, batch_size=4, seq_len=16, split="eval", seed=0)
    train_rows = {tuple(r) for i in range(tr.n_train // 4) for r in tr.batch(i)["inputs"]}
    eval_rows = {tuple(r) for i in range(3) for r in ev.batch(i)["inputs"]}
    assert not train_rows & eval_rows
    # a full epoch visits every training row once, in a seed-dependent order
    assert len(train_rows) == tr.n_train // 4 * 4
    other = D.TextData(tokens, e, batch_size=4, seq_len=16, split="train", seed=1)
    assert not np.array_equal(tr.batch(0)["inputs"], other.batch(0)["inputs"])


def test_missing_data_path(tmp_path):
    with pytest.raises(D.DataError, match="--data"):
        D.load_tokens(tmp_path / "nope")
    with pytest.raises(D.DataError, match="--data"):
        D.make_source("text", batch_size=2, seq_len=8, seed=0)


# ------------------------------------------------------------------------------- determinism


@pytest.mark.parametrize("task", ["mqar", "niah", "text"])
def test_determinism_and_resume(task, text_dir):
    kw = dict(batch_size=4, seq_len=200 if task == "niah" else 32, seed=5)
    if task == "text":
        kw["data"] = str(text_dir)

    def make():
        return D.make_source(task, **kw)

    a, b = make(), make()
    assert D.fingerprint(a.batch(3)) == D.fingerprint(b.batch(3))
    assert D.fingerprint(a.batch(3)) != D.fingerprint(a.batch(4))
    ev = D.make_source(task, split="eval", **kw)
    assert D.fingerprint(ev.batch(0)) != D.fingerprint(a.batch(0))

    # iterator state round trip: stop after 3 batches, restore into a fresh iterator
    straight = D.DataIterator(make())
    expected = [D.fingerprint(next(straight)) for _ in range(6)]
    first = D.DataIterator(make())
    got = [D.fingerprint(next(first)) for _ in range(3)]
    state = first.state_dict()
    assert state == {"index": 3}
    import json

    resumed = D.DataIterator(make())
    resumed.load_state_dict(json.loads(json.dumps(state)))
    got += [D.fingerprint(next(resumed)) for _ in range(3)]
    assert got == expected
