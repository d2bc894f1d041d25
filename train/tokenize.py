"""``qdelta-tokenize --tokenizer FILE --out DIR INPUT...``: text to token shards.

The tokenizer is a Hugging Face ``tokenizers`` JSON file (``tokenizer.json``; the optional extra
``pip install 'qdelta-jax[tokenizers]'``). Its end-of-document (EOS) id is ``--eos-id`` when
given, else the ``eos_token`` of a ``tokenizer_config.json`` beside the file, else the first of
``</s>``, ``<|endoftext|>``, ``<eos>``, ``<|end_of_text|>`` that the tokenizer knows.

Documents (each followed by the EOS id in the shards):

* a ``.jsonl`` file: one document per line, its ``"text"`` field (``--text-field``), the layout
  of the JSON-lines corpora that fla/flame users train on; blank lines are skipped;
* any other file: the whole file (UTF-8) is one document; with ``--split-blank-lines`` each block
  of lines between blank lines is one;
* a folder: every file under it (sorted, recursive; hidden entries skipped), each as above;
  files in it that are not UTF-8 text are skipped with a warning.

DIR (new or empty) receives ``shard-00000.bin``, ``shard-00001.bin``, ... (raw little-endian
uint16 ids when the vocabulary has at most 65536 ids, else ``shard-00000.u32.bin`` uint32, the
naming ``qdelta-train`` reads), a copy of the tokenizer as ``tokenizer.json`` and
``manifest.json`` (the tokenizer, vocabulary size, EOS id, dtype, and token and document counts
of every shard and in all). A shard ends after the document that takes it to ``--shard-tokens``
tokens, so no document is split between shards. ``qdelta-train --task text --data DIR`` reads
the shards by memory map and takes the vocabulary, the EOS id and the tokenizer from the
manifest.

Errors (a missing or unreadable tokenizer, a tokenizer without an EOS token, an input that is
missing, not UTF-8 or a bad JSON line) are one line naming the argument; exit status 2.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import shutil
import sys
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from qdelta_jax.train.data import MANIFEST, DataError, DataWarning

PROG = "qdelta-tokenize"
EOS_NAMES = ("</s>", "<|endoftext|>", "<eos>", "<|end_of_text|>")
UINT16_VOCAB = 1 << 16
DEFAULT_SHARD_TOKENS = 1 << 27  # 256 MiB of uint16 per shard
TOKENIZER_COPY = "tokenizer.json"


def _install_hint() -> str:
    return "pip install 'qdelta-jax[tokenizers]' (or pip install tokenizers)"


@functools.lru_cache(maxsize=8)
def _load(path: str, mtime_ns: int, size: int):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(path)


def load_tokenizer(path: str | os.PathLike, flag: str = "--tokenizer"):
    """A ``tokenizers.Tokenizer`` from its JSON file (cached per file and modification time).
    Raises :class:`DataError` naming ``flag`` for a missing package, a missing file or one
    that is not a tokenizer."""
    p = Path(path)
    try:
        import tokenizers  # noqa: F401
    except ImportError:
        raise DataError(f"{flag} needs the tokenizers package: {_install_hint()}", flag) from None
    if not p.is_file():
        what = "is a folder; pass its tokenizer.json" if p.is_dir() else "no such file"
        raise DataError(f"{flag} {path}: {what}", flag)
    try:
        st = p.stat()
        return _load(str(p.resolve()), st.st_mtime_ns, st.st_size)
    except Exception as e:  # noqa: BLE001 -- the Rust side raises plain Exceptions
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(f"{flag} {path}: not a tokenizers JSON file ({first})", flag) from None


def vocab_size(tok) -> int:
    """Ids the tokenizer can produce: one more than its largest id, added tokens included."""
    return max(tok.get_vocab(with_added_tokens=True).values()) + 1


def shard_dtype(vocab: int) -> type:
    return np.uint16 if vocab <= UINT16_VOCAB else np.uint32


def find_eos(tok, path, eos_id: int | None = None, flag: str = "--tokenizer") -> int:
    """The end-of-document id: ``eos_id`` when given (checked against the vocabulary), else
    the ``eos_token`` of a ``tokenizer_config.json`` beside ``path``, else the first of
    :data:`EOS_NAMES` the tokenizer knows. Raises :class:`DataError` when there is none."""
    n = vocab_size(tok)
    if eos_id is not None:
        if not 0 <= eos_id < n:
            raise DataError(f"--eos-id {eos_id} is outside the vocabulary of {flag} {path} "
                            f"(ids 0..{n - 1})", "--eos-id")
        return int(eos_id)
    cfg = Path(path).parent / "tokenizer_config.json"
    names = list(EOS_NAMES)
    if cfg.is_file():
        try:
            eos = json.loads(cfg.read_text()).get("eos_token")
        except (OSError, ValueError, AttributeError):
            eos = None
        eos = eos.get("content") if isinstance(eos, dict) else eos
        if isinstance(eos, str):
            names.insert(0, eos)
    for name in names:
        i = tok.token_to_id(name)
        if i is not None:
            return int(i)
    raise DataError(f"{flag} {path}: the tokenizer has no end-of-document token (none of "
                    f"{', '.join(EOS_NAMES)}); pass --eos-id ID", flag)


def encode(tok, texts: list[str]) -> list[np.ndarray]:
    """Token ids of each text (no special tokens added: documents are joined with the EOS id
    only)."""
    if not texts:
        return []
    return [np.asarray(e.ids, np.int64) for e in tok.encode_batch(texts,
                                                                   add_special_tokens=False)]


def documents(path: Path, text: str, *, text_field: str = "text",
              split_blank_lines: bool = False, flag: str = "INPUT") -> Iterator[str]:
    """The documents of one file's text, by the rules of the module docstring."""
    if path.suffix == ".jsonl":
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError as e:
                raise DataError(f"{flag} {path} line {n}: not valid JSON ({e})", flag) from None
            doc = rec.get(text_field) if isinstance(rec, dict) else None
            if not isinstance(doc, str):
                raise DataError(f"{flag} {path} line {n}: expected a JSON object with a string "
                                f"{text_field!r} field (--text-field)", flag)
            if doc:
                yield doc
    elif split_blank_lines:
        block: list[str] = []
        for line in text.splitlines(keepends=True):
            if line.strip():
                block.append(line)
            elif block:
                yield "".join(block).rstrip("\n")
                block = []
        if block:
            yield "".join(block).rstrip("\n")
    elif text:
        yield text


def _input_files(inputs: Iterable[str]) -> list[tuple[Path, bool]]:
    """``(file, named on the command line)`` for every input; folders are walked."""
    out = []
    for s in inputs:
        p = Path(s)
        if p.is_dir():
            for root, dirs, names in os.walk(p):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                out += [(Path(root) / n, False) for n in sorted(names) if not n.startswith(".")]
        elif p.is_file():
            out.append((p, True))
        else:
            raise DataError(f"INPUT {s}: no such file or directory", "INPUT")
    if not out:
        raise DataError(f"INPUT {', '.join(inputs)}: no files", "INPUT")
    return out


def _read_text(f: Path, explicit: bool) -> str | None:
    try:
        raw = f.read_bytes()
        return raw.decode("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        why = e.strerror if isinstance(e, OSError) else f"not UTF-8 text ({e.reason} at byte " \
            f"{e.start})"
        if explicit:
            raise DataError(f"INPUT {f}: {why}", "INPUT") from None
        return None


class _ShardWriter:
    """Writes whole documents into shards of about ``shard_tokens`` ids."""

    def __init__(self, out: Path, dtype, shard_tokens: int):
        self.out, self.dtype, self.shard_tokens = out, dtype, shard_tokens
        self.suffix = ".bin" if dtype == np.uint16 else ".u32.bin"
        self.shards: list[dict] = []
        self.f = None

    def _open(self):
        name = f"shard-{len(self.shards):05d}{self.suffix}"
        self.f = open(self.out / name, "wb")  # noqa: SIM115 -- closed in _close
        self.shards.append({"file": name, "tokens": 0, "documents": 0})

    def _close(self):
        if self.f is not None:
            self.f.close()
            self.f = None

    def add(self, ids: np.ndarray) -> None:
        if self.f is None:
            self._open()
        self.f.write(np.ascontiguousarray(ids, dtype=self.dtype).tobytes())
        cur = self.shards[-1]
        cur["tokens"] += int(ids.size)
        cur["documents"] += 1
        if cur["tokens"] >= self.shard_tokens:
            self._close()

    def finish(self) -> list[dict]:
        self._close()
        return self.shards


def _remove(out: Path, shards: list[dict], created: bool) -> None:
    """Removes the shards of a failed run (``out`` held nothing before it)."""
    for s in shards:
        (out / s["file"]).unlink(missing_ok=True)
    if created:
        try:
            out.rmdir()
        except OSError:
            pass


def write_shards(tokenizer: str | os.PathLike, inputs: list[str], out: str | os.PathLike, *,
                 eos_id: int | None = None, shard_tokens: int = DEFAULT_SHARD_TOKENS,
                 text_field: str = "text", split_blank_lines: bool = False,
                 progress: bool = True, batch_docs: int = 256) -> dict:
    """Tokenises ``inputs`` into shards in ``out`` (see the module docstring); returns the
    manifest it wrote. Raises :class:`DataError` (its ``flag`` names the argument) before
    anything is written when an option is bad; an input found bad mid-way removes the partial
    output (``out`` was empty)."""
    if shard_tokens < 1:
        raise DataError(f"--shard-tokens must be >= 1, got {shard_tokens}", "--shard-tokens")
    if batch_docs < 1:
        raise DataError(f"--batch-docs must be >= 1, got {batch_docs}", "--batch-docs")
    tok = load_tokenizer(tokenizer)
    eos = find_eos(tok, tokenizer, eos_id)
    vocab = vocab_size(tok)
    files = _input_files(inputs)
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DataError(f"--out {out}: exists and is not an empty folder; choose a new one "
                        "(nothing in it is overwritten)", "--out")
    dtype = shard_dtype(vocab)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    writer = _ShardWriter(out, dtype, shard_tokens)
    eos_arr = np.array([eos], np.int64)
    skipped: list[str] = []
    try:
        from tqdm import tqdm

        total = sum(f.stat().st_size for f, _ in files)
        with tqdm(total=total, unit="B", unit_scale=True, desc="tokenize", disable=not progress,
                  file=sys.stderr, mininterval=0.5 if sys.stderr.isatty() else 30.0) as bar:
            pending: list[str] = []

            def flush():
                for ids in encode(tok, pending):
                    writer.add(np.concatenate([ids, eos_arr]))
                pending.clear()

            for f, explicit in files:
                text = _read_text(f, explicit)
                if text is None:
                    skipped.append(str(f))
                else:
                    for doc in documents(f, text, text_field=text_field,
                                         split_blank_lines=split_blank_lines):
                        pending.append(doc)
                        if len(pending) >= batch_docs:
                            flush()
                bar.update(f.stat().st_size)
            flush()
        shards = writer.finish()
    except BaseException:
        _remove(out, writer.finish(), created)
        raise
    if skipped:
        warnings.warn(f"{PROG}: skipped {len(skipped)} files that are not UTF-8 text: "
                      f"{', '.join(skipped[:3])}{', ...' if len(skipped) > 3 else ''}",
                      DataWarning, stacklevel=2)
    if not shards:
        _remove(out, shards, created)
        raise DataError(f"INPUT {', '.join(inputs)}: no documents (empty or skipped files)",
                        "INPUT")
    shutil.copyfile(tokenizer, out / TOKENIZER_COPY)
    manifest = {
        "tokenizer_file": TOKENIZER_COPY,
        "tokenizer_source": str(Path(tokenizer).resolve()),
        "tokenizer_sha256": hashlib.sha256(Path(tokenizer).read_bytes()).hexdigest(),
        "vocab_size": vocab,
        "eos_id": eos,
        "dtype": np.dtype(dtype).name,
        "tokens": sum(s["tokens"] for s in shards),
        "documents": sum(s["documents"] for s in shards),
        "shards": shards,
        "inputs": [str(Path(s).resolve()) for s in inputs],
        "rules": {"jsonl_text_field": text_field, "split_blank_lines": split_blank_lines},
    }
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    tmp.replace(out / MANIFEST)  # the manifest appears only once every shard is complete
    return manifest


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Tokenise text files into uint16/uint32 "
                                ".bin shards for qdelta-train --task text --data DIR.")
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="text files, .jsonl files (one document per line) or folders")
    p.add_argument("--tokenizer", required=True, metavar="FILE",
                   help="a Hugging Face tokenizers JSON file (tokenizer.json)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (new or empty)")
    p.add_argument("--eos-id", type=int, default=None,
                   help="end-of-document id (default: the tokenizer's EOS token)")
    p.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS,
                   help=f"tokens per shard, about (default: {DEFAULT_SHARD_TOKENS})")
    p.add_argument("--text-field", default="text", help="field of a .jsonl line holding its "
                   "text (default: text)")
    p.add_argument("--split-blank-lines", action="store_true",
                   help="split plain-text files into documents at blank lines (default: one "
                   "document per file)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    try:
        m = write_shards(a.tokenizer, a.inputs, a.out, eos_id=a.eos_id,
                         shard_tokens=a.shard_tokens, text_field=a.text_field,
                         split_blank_lines=a.split_blank_lines, progress=not a.no_progress)
    except DataError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    print(f"{a.out}: {m['tokens']:,} tokens ({m['dtype']}) in {len(m['shards'])} shards, "
          f"{m['documents']:,} documents, vocabulary {m['vocab_size']}, eos id {m['eos_id']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
