"""Tests of tokenizers and token shards: ``qdelta-tokenize`` (EOS between documents, uint16 or
uint32 shards, the manifest, the document rules), the shard folder read by memory map, text
tokenised in the trainer with ``--tokenizer``, the tokenizer copied into the run directory and
used by ``qdelta-eval`` and ``qdelta-generate``, the text metrics (loss, perplexity, bits per
byte) and the one-line errors. The tokenizers are built here with the ``tokenizers`` package
(nothing is downloaded)."""

from __future__ import annotations

import contextlib
import io
import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest

tokenizers = pytest.importorskip("tokenizers")

from qdelta_jax.train import data as D  # noqa: E402
from qdelta_jax.train import tokenize as T  # noqa: E402

pytestmark = pytest.mark.usefixtures("xla_cache")

WORDS = ("the quick brown fox jumps over a lazy dog while one cat sat on the warm mat and "
         "naïve café owners ran far away").split()


def corpus(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(8, 40)))) for _ in range(n)]


def byte_bpe(path: Path, vocab: int = 300, eos: str | None = "<|endoftext|>") -> Path:
    """A byte-level BPE tokenizer (GPT-2 style) trained on the test corpus; its vocabulary
    stays under 320 so the tiny model has the byte-level run's shape."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=[eos] if eos else [],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(corpus(50, seed=1), trainer)
    tok.save(str(path))
    return path


def word_level(path: Path, n: int, eos: str | None = "</s>") -> Path:
    """A WordLevel tokenizer of ``n`` ids: ``w0 .. w{n-2}`` and the EOS (or ``w{n-1}``)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(n - 1)}
    vocab[eos or f"w{n - 1}"] = n - 1
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(path))
    return path


def ids_of(tok_path: Path, text: str) -> list[int]:
    tok = T.load_tokenizer(tok_path)
    return tok.encode(text, add_special_tokens=False).ids


def run_main(main, argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            rc = main(argv)
        except SystemExit as e:  # argparse
            rc = e.code
    return rc, out.getvalue(), err.getvalue()


# ------------------------------------------------------------------------------ shards


def test_shards_hold_every_document_then_eos(tmp_path):
    """The shards are the documents' ids in input order, each followed by the EOS id; a shard
    ends only after a document; the manifest counts what the files hold."""
    tok = byte_bpe(tmp_path / "tok.json")
    docs = corpus(12)
    (tmp_path / "a.jsonl").write_text(
        "\n".join(json.dumps({"text": d, "id": i}) for i, d in enumerate(docs[:8])) + "\n\n")
    (tmp_path / "b.txt").write_text("\n\n".join(docs[8:]) + "\n")
    (tmp_path / "c.txt").write_text(docs[0])
    m = T.write_shards(tok, [str(tmp_path / n) for n in ("a.jsonl", "b.txt", "c.txt")],
                       tmp_path / "out", shard_tokens=60, split_blank_lines=True,
                       progress=False)
    eos = ids_of(tok, "<|endoftext|>")[0]
    assert m["eos_id"] == eos and m["dtype"] == "uint16" and m["vocab_size"] == 300
    want = [t for d in docs + [docs[0]] for t in ids_of(tok, d) + [eos]]
    files = sorted((tmp_path / "out").glob("shard-*.bin"))
    assert [f.name for f in files] == [s["file"] for s in m["shards"]] and len(files) > 2
    got = [np.fromfile(f, np.uint16) for f in files]
    assert all(g[-1] == eos for g in got), "a shard ends after a whole document"
    assert all(g.size >= 60 for g in got[:-1])
    np.testing.assert_array_equal(np.concatenate(got), want)
    assert [s["tokens"] for s in m["shards"]] == [g.size for g in got]
    assert m["documents"] == 13 and m["tokens"] == len(want)
    saved = json.loads((tmp_path / "out" / D.MANIFEST).read_text())
    assert saved == json.loads(json.dumps(m))
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == tok.read_bytes()


def test_one_document_per_file_and_folders(tmp_path):
    tok = byte_bpe(tmp_path / "tok.json")
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text("one cat\n\nsat on the mat")
    (src / "sub" / "b.txt").write_text("the fox")
    (src / "bin.dat").write_bytes(b"\xff\xfe\x00")  # not text: skipped with a warning
    with pytest.warns(D.DataWarning, match="not UTF-8"):
        m = T.write_shards(tok, [str(src)], tmp_path / "out", progress=False)
    eos = m["eos_id"]
    want = ids_of(tok, "one cat\n\nsat on the mat") + [eos] + ids_of(tok, "the fox") + [eos]
    np.testing.assert_array_equal(np.fromfile(tmp_path / "out" / "shard-00000.bin", np.uint16),
                                  want)


def test_uint16_up_to_65536_ids_else_uint32(tmp_path):
    assert T.shard_dtype(65536) == np.uint16 and T.shard_dtype(65537) == np.uint32
    text = "w3 w65000 w65535 w70000"
    for n, suffix, dtype in ((65536, ".bin", np.uint16), (70002, ".u32.bin", np.uint32)):
        tok = word_level(tmp_path / f"w{n}.json", n)
        (tmp_path / "t.txt").write_text(text)
        out = tmp_path / f"out{n}"
        m = T.write_shards(tok, [str(tmp_path / "t.txt")], out, progress=False)
        f = out / f"shard-00000{suffix}"
        assert m["dtype"] == np.dtype(dtype).name and f.is_file()
        want = ids_of(tok, text) + [n - 1]
        assert max(want) > 65535 or n == 65536
        np.testing.assert_array_equal(np.fromfile(f, dtype), want)
        tokens, eos, vocab = D.load_tokens(out)
        assert (eos, vocab) == (n - 1, n)
        np.testing.assert_array_equal(tokens[0 : tokens.size], want)


def test_shard_folder_is_memory_mapped(tmp_path):
    """A folder of shards reads as one stream of memory maps (slices across shard edges read
    only the shards they touch); a shard boundary is a document boundary even without an EOS;
    every shard's ids are range-checked."""
    rng = np.random.default_rng(0)
    parts = [rng.integers(1, 500, size=n).astype(np.uint16) for n in (320, 7, 450)]
    for i, p in enumerate(parts):
        p.tofile(tmp_path / f"part{i}.bin")
    tokens, eos, vocab = D.load_tokens(tmp_path)
    assert isinstance(tokens, D.ShardedTokens) and eos is None
    assert all(isinstance(m, np.memmap) for m in tokens.maps)
    whole = np.concatenate(parts)
    assert tokens.size == whole.size and vocab == int(whole.max()) + 1
    for lo, hi in ((0, 10), (315, 330), (319, 328), (326, 777), (0, 777), (700, 900)):
        np.testing.assert_array_equal(tokens[lo:hi], whole[lo:hi])
    assert int(tokens[325]) == int(whole[325])
    src = D.TextData(tokens, eos, batch_size=2, seq_len=16)
    ends = 0
    np.testing.assert_array_equal(src.starts, [320, 327])
    for i in range(src.n_train // 2):
        b = src.batch(i)
        for r, row in enumerate(src._row_ids(i)):
            lo = int(row) * 16
            for s in (320, 327):
                if lo < s <= lo + 16:
                    assert b["mask"][r, s - lo - 1] == 0, "no target crosses a shard edge"
                    ends += s == lo + 16
                if lo < s < lo + 16:
                    assert s - lo in b["cu_seqlens"][r]
    assert ends, "a row that ends at a shard edge was seen"
    # a shard with an id no vocabulary could hold is refused, naming that shard
    np.array([1, 2, 30_000_000], np.uint32).tofile(tmp_path / "z.u32.bin")
    with pytest.raises(D.DataError, match=r"z\.u32\.bin: token id 30000000 at position 2"):
        D.load_tokens(tmp_path)


def test_text_with_tokenizer_in_the_trainer(tmp_path):
    """``--data`` text with ``--tokenizer``: the files (a .jsonl: its lines) are tokenised in
    memory, the EOS between documents; the vocabulary is the tokenizer's; --eos-id overrides
    its EOS."""
    tok = byte_bpe(tmp_path / "tok.json")
    d = tmp_path / "text"
    d.mkdir()
    docs = corpus(3)
    (d / "a.txt").write_text(docs[0])
    (d / "b.jsonl").write_text("\n".join(json.dumps({"text": x}) for x in docs[1:]))
    tokens, eos, vocab = D.load_tokens(d, tokenizer=tok)
    assert eos == ids_of(tok, "<|endoftext|>")[0] and vocab == 300
    np.testing.assert_array_equal(tokens, [t for x in docs for t in ids_of(tok, x) + [eos]])
    tokens, eos, _ = D.load_tokens(d / "a.txt", eos_id=5, tokenizer=tok)
    assert eos == 5 and tokens[-1] == 5


def test_bytes_of_the_evaluated_text(tmp_path):
    """Bits per byte divide by the UTF-8 bytes the masked targets decode to. Byte level: one a
    target below 256. A byte-level BPE: a token's string maps each character to one byte, so
    the bytes are the summed token lengths (an oracle that does not decode)."""
    (tmp_path / "a.txt").write_text(" ".join(corpus(30)))
    src = D.make_source("text", batch_size=4, seq_len=32, seed=0, split="eval",
                        data=str(tmp_path / "a.txt"))
    b = src.batch(0)
    assert src.target_bytes(b) == int(((b["targets"] < 256) & (b["mask"] > 0)).sum()) > 0
    tok_path = byte_bpe(tmp_path / "tok.json")
    tok = T.load_tokenizer(tok_path)
    src = D.make_source("text", batch_size=4, seq_len=32, seed=0, split="eval",
                        data=str(tmp_path / "a.txt"), tokenizer=str(tok_path))
    b = src.batch(0)
    b["mask"][1, 5:9] = 0  # two runs in this row
    special = {tok.token_to_id("<|endoftext|>")}
    want = sum(len(tok.id_to_token(int(t))) for t, m in zip(b["targets"].ravel(),
                                                             b["mask"].ravel())
               if m > 0 and int(t) not in special)
    assert src.target_bytes(b) == want > 0
    from qdelta_jax.train.evaluate import text_metrics

    r = text_metrics(2.0, 100, 250)
    assert r["perplexity"] == pytest.approx(math.exp(2.0))
    assert r["bits_per_byte"] == pytest.approx(200 / (250 * math.log(2)))
    assert text_metrics(2.0, 100, None)["bits_per_byte"] is None


# ------------------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def shard_run(tmp_path_factory):
    """qdelta-tokenize -> shards -> qdelta-train (tiny, 2 steps) on the shard folder."""
    from qdelta_jax.train import cli

    tmp = tmp_path_factory.mktemp("tok")
    tok = byte_bpe(tmp / "tok.json")
    (tmp / "c.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in corpus(120)))
    rc, out, err = run_main(T.main, ["--tokenizer", str(tok), "--out", str(tmp / "shards"),
                                     str(tmp / "c.jsonl"), "--shard-tokens", "1500"])
    assert rc == 0, err
    assert "tokenize: 100%" in err, "the progress bar"
    run = tmp / "run"
    argv = ["--task", "text", "--data", str(tmp / "shards"), "--steps", "2", "--batch-size", "4",
            "--seq-len", "32", "--warmup", "1", "--eval-every", "0", "--eval-batches", "1",
            "--save-every", "0", "--no-progress", "--run-dir", str(run)]
    rc, out, err = run_main(cli.main, argv)
    assert rc == 0, err
    return tmp, tok, run, out


def test_training_on_shards_reports_text_metrics(shard_run):
    tmp, tok, run, out = shard_run
    assert (run / "tokenizer.json").read_bytes() == tok.read_bytes()
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["model"]["vocab_size"] == 320, "the tokenizer's 300 ids, rounded up to 64"
    ev = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()
          if '"eval"' in x][-1]
    assert ev["perplexity"] == pytest.approx(math.exp(ev["loss"]))
    assert ev["bits_per_byte"] == pytest.approx(
        ev["loss"] * ev["tokens"] / (math.log(2) * ev["bytes"]))
    assert 0 < ev["bits_per_byte"] < ev["loss"] / math.log(2), "several bytes a token"
    assert "perplexity" in out and "bits per byte" in out and "recall accuracy" not in out


def test_eval_of_a_text_run(shard_run, tmp_path):
    from qdelta_jax.train import evaluate

    tmp, tok, run, _ = shard_run
    tok.rename(tmp / "moved.json")  # qdelta-eval uses the run's copy
    try:
        rc, out, err = run_main(evaluate.main, [str(run), "--seq-lens", "32", "--batches", "1",
                                                "--no-plot", "--out", str(tmp_path)])
    finally:
        (tmp / "moved.json").rename(tok)
    assert rc == 0, err
    head = out.splitlines()[1].split()
    assert head == ["seq_len", "loss", "ppl", "bpb", "tokens"]
    row = json.loads((tmp_path / "eval.json").read_text())["rows"][0]
    final = json.loads((run / "summary.json").read_text())["eval"]
    # the same held-out batch as the trainer's final evaluation
    for k in ("loss", "perplexity", "bits_per_byte", "bytes"):
        assert row[k] == pytest.approx(final[k], rel=1e-5), k


def test_generate_decodes_with_the_run_tokenizer(shard_run, capsys):
    import jax
    import jax.numpy as jnp

    from qdelta_jax.model import generate
    from qdelta_jax.train import generate as gen_cli
    from qdelta_jax.train import load_model

    _, tok_path, run, _ = shard_run
    tok = T.load_tokenizer(tok_path)
    prompt = "the quick brown"
    capsys.readouterr()
    rc = gen_cli.main([str(run), prompt, "--max-new-tokens", "6", "--temperature", "0.9",
                       "--seed", "2"])
    out = capsys.readouterr().out
    assert rc == 0
    model = load_model(run)
    eos = tok.token_to_id("<|endoftext|>")
    want, n = generate(model, jnp.asarray([ids_of(tok_path, prompt)], jnp.int32), 6,
                       temperature=0.9, rng=jax.random.key(2), eos_id=eos, return_lengths=True)
    ids = [int(t) for t in want[0, : int(n[0])]]
    assert out == tok.decode(ids, skip_special_tokens=True) + "\n"


# ------------------------------------------------------------------------------ errors


def _cli_error(argv, prog: str = "train") -> str:
    from qdelta_jax.train import cli

    main = {"train": cli.main, "tokenize": T.main}[prog]
    rc, _, err = run_main(main, argv)
    assert rc == 2, err
    assert "Traceback" not in err
    lines = [x for x in err.splitlines() if "error:" in x]
    assert len(lines) == 1, err
    return lines[0]


TRAIN = ["--task", "text", "--steps", "1", "--batch-size", "4", "--seq-len", "32",
         "--no-progress"]


def _text(d: Path) -> str:
    (d / "t.txt").write_text(" ".join(corpus(40)))
    return str(d / "t.txt")


def _not_a_tokenizer(d: Path) -> str:
    (d / "bad.json").write_text('{"model": 3}')
    return str(d / "bad.json")


ERRORS = [
    ("missing tokenizer file", lambda d: _cli_error(
        TRAIN + ["--data", _text(d), "--tokenizer", str(d / "none.json")]),
     "--tokenizer", "no such file"),
    ("not a tokenizer", lambda d: _cli_error(
        TRAIN + ["--data", _text(d), "--tokenizer", _not_a_tokenizer(d)]),
     "--tokenizer", "not a tokenizers JSON file"),
    ("tokenizer without EOS", lambda d: _cli_error(
        TRAIN + ["--data", _text(d), "--tokenizer", str(word_level(d / "w.json", 50, None))]),
     "--tokenizer", "no end-of-document token"),
    ("--eos-id outside the tokenizer", lambda d: _cli_error(
        TRAIN + ["--data", _text(d), "--tokenizer", str(byte_bpe(d / "b.json")),
                 "--eos-id", "400"]), "--eos-id", "outside the vocabulary"),
    ("--tokenizer without --task text", lambda d: _cli_error(
        ["--tokenizer", str(byte_bpe(d / "b.json"))]), "--tokenizer", "--task text only"),
    ("tokenize: missing INPUT", lambda d: _cli_error(
        ["--tokenizer", str(byte_bpe(d / "b.json")), "--out", str(d / "o"), str(d / "no.txt")],
        "tokenize"), "INPUT", "no such file"),
    ("tokenize: INPUT not UTF-8", lambda d: _cli_error(
        ["--tokenizer", str(byte_bpe(d / "b.json")), "--out", str(d / "o"),
         str(_write(d / "x.txt", b"ok \xff\xfe"))], "tokenize"), "INPUT", "not UTF-8"),
    ("tokenize: bad JSON line", lambda d: _cli_error(
        ["--tokenizer", str(byte_bpe(d / "b.json")), "--out", str(d / "o"),
         str(_write(d / "x.jsonl", b'{"text": "a"}\n{"text": 3}\n'))], "tokenize"),
     "INPUT", "line 2: expected a JSON object with a string 'text' field"),
    ("tokenize: tokenizer without EOS", lambda d: _cli_error(
        ["--tokenizer", str(word_level(d / "w.json", 50, None)), "--out", str(d / "o"),
         _text(d)], "tokenize"), "--tokenizer", "no end-of-document token"),
    ("tokenize: --out not empty", lambda d: _cli_error(
        ["--tokenizer", str(byte_bpe(d / "b.json")), "--out", str(d), _text(d)], "tokenize"),
     "--out", "not an empty folder"),
]


def _write(p: Path, raw: bytes) -> Path:
    p.write_bytes(raw)
    return p


@pytest.mark.parametrize("case", ERRORS, ids=[c[0] for c in ERRORS])
def test_errors_are_one_line_naming_the_argument(case, tmp_path):
    _, fn, flag, phrase = case
    msg = fn(tmp_path)
    assert flag in msg and phrase in msg, msg
    assert not (tmp_path / "o").exists(), "a failed qdelta-tokenize leaves no output"


def test_damaged_shard_folder_is_refused(tmp_path):
    tok = byte_bpe(tmp_path / "tok.json")
    T.write_shards(tok, [_text(tmp_path)], tmp_path / "out", shard_tokens=100, progress=False)
    first = tmp_path / "out" / "shard-00000.bin"
    first.write_bytes(first.read_bytes()[:-4])  # an interrupted copy
    with pytest.raises(D.DataError, match=r"shard-00000\.bin: holds \d+ tokens, manifest\.json"):
        D.load_tokens(tmp_path / "out")
    T.write_shards(tok, [_text(tmp_path)], tmp_path / "out2", progress=False)
    with pytest.raises(D.DataError, match="outside the tokenizer's vocabulary") as e:
        D.load_tokens(tmp_path / "out2", tokenizer=word_level(tmp_path / "w.json", 20))
    assert e.value.flag == "--tokenizer"


def test_resume_with_another_tokenizer_is_refused(shard_run, tmp_path):
    import shutil

    _, _, run, _ = shard_run
    other = tmp_path / "run"
    shutil.copytree(run, other)
    before = (other / "tokenizer.json").read_bytes()
    (tmp_path / "d").mkdir()
    msg = _cli_error(TRAIN + ["--data", _text(tmp_path / "d"), "--run-dir", str(other),
                              "--tokenizer", str(byte_bpe(tmp_path / "b.json", vocab=290))])
    assert "--tokenizer" in msg and "differs" in msg, msg
    assert (other / "tokenizer.json").read_bytes() == before


def test_missing_tokenizers_package_is_named(tmp_path, monkeypatch):
    tok = byte_bpe(tmp_path / "tok.json")
    monkeypatch.setitem(__import__("sys").modules, "tokenizers", None)  # import fails
    msg = _cli_error(TRAIN + ["--data", _text(tmp_path), "--tokenizer", str(tok)])
    assert "--tokenizer needs the tokenizers package: pip install 'qdelta-jax[tokenizers]'" in msg
