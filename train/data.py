"""Training data: the recall tasks of docs/MATH.md section 6 (MQAR, needle in a haystack) and
plain text.

Every source is a pure function of ``(seed, batch index)``: ``source.batch(i)`` always returns
the same arrays, so the iterator's whole state is the index of the next batch (a JSON-able dict,
saved in each checkpoint) and a resumed run sees exactly the batches an uninterrupted run would.

A batch is a dict of numpy arrays (B batch, T time, S segments a row):

* ``inputs  [B, T] int32``   -- token ids fed to the model,
* ``targets [B, T] int32``   -- the next token at each position,
* ``mask    [B, T] float32`` -- 1 where the loss and accuracy count, else 0,
* ``cu_seqlens [B, S+1] int32`` (text only) -- per-row document offsets: the row starts at 0,
  ends at T, is non-decreasing and is padded by repeating T; the model resets its state and its
  short-conv cache at every offset.

Sources:

* :class:`MQAR` -- multi-query associative recall (Zoology). The vocabulary is split into noise,
  key and value tokens (see :meth:`MQAR.layout`). A row is ``P`` pairs ``k1 v1 ... kP vP`` with
  distinct keys, then the keys queried again in random order, each followed by its value, at
  random later positions, the gaps filled with random noise tokens. The mask is 1 exactly at the
  positions holding a queried key (where the target is its value).
* :class:`NIAH` -- single-needle retrieval on bytes (vocabulary 256): filler text, one needle
  ``"the special magic number for K is V."`` at a chosen depth, and a final question. The mask
  covers the answer bytes, and a row is answered when all of them are right (exact match: with
  teacher forcing all-correct equals greedy decoding producing the answer). Variants
  (``NIAH_VARIANTS``), after RULER's S-NIAH 1-3: ``passkey`` (5-digit number in repeated
  filler), ``number`` (7-digit number in varied text), ``uuid`` (a 36-character id in varied
  text).
* :class:`TextData` -- a UTF-8 file or a folder of them (byte-level tokens, vocabulary 257: the
  256 bytes and an end-of-document token 256), or a pre-tokenised ``.npy`` (any unsigned or
  signed integer dtype, opened with ``mmap_mode="r"``) or ``.bin`` file (raw little-endian
  ``uint16``, the nanoGPT convention, read with ``np.memmap``; name it ``*.u32.bin`` for
  ``uint32`` ids, needed when the vocabulary exceeds 65536), or a folder of such ``.bin`` shards
  (the output of ``qdelta-tokenize``; every top-level ``*.bin``, in name order, each a memory
  map, never loaded whole; ids range-checked shard by shard; its ``manifest.json`` gives the
  vocabulary, the end-of-document id and the tokenizer). With a tokenizer (a Hugging Face
  ``tokenizers`` JSON file) text files are tokenised with it instead of bytes, one document per
  file (per line of a ``.jsonl``, its ``"text"`` field), the tokenizer's end-of-document token
  after each. Documents are concatenated and cut into rows of ``T + 1`` tokens; a shard
  boundary is a document boundary; document starts inside a row become its ``cu_seqlens``; the
  target that would cross a document boundary is masked. The last ~1 % of rows (at least one
  batch) are held out for evaluation; training rows are shuffled per epoch.
"""

from __future__ import annotations

import json
import os
import stat
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

Batch = dict[str, np.ndarray]

TASKS = ("mqar", "niah", "text")
NIAH_VARIANTS = ("passkey", "number", "uuid")

# Streams of the per-batch random generator: training and evaluation data never coincide.
TRAIN_STREAM = 0
EVAL_STREAM = 1


class DataError(ValueError):
    """A data option is invalid (bad path, sizes that do not fit). ``flag`` names the CLI flag."""

    def __init__(self, message: str, flag: str = "--data"):
        super().__init__(message)
        self.flag = flag


class DataWarning(UserWarning):
    """Files of a ``--data`` folder that were skipped (not regular files, unreadable)."""


# Token ids of pre-tokenised files must lie in [0, MAX_VOCAB): a larger id is far more often a
# file read with the wrong dtype than a real vocabulary (its embedding alone would be huge).
MAX_VOCAB = 1 << 24


def _rng(seed: int, stream: int, index: int, salt: int = 0) -> np.random.Generator:
    # A counter-based stream: batch i of run seed s is independent of every other batch and
    # needs no generator state to be carried or saved.
    return np.random.default_rng([int(seed), int(stream), int(index), int(salt)])


# ----------------------------------------------------------------------------------------------
# MQAR


@dataclass(frozen=True)
class MQAR:
    """Multi-query associative recall; see the module docstring.

    Args:
      batch_size: B, rows per batch.
      seq_len: T, model input length. Needs ``4 * num_pairs <= seq_len + 1``.
      num_pairs: P, key-value pairs per row.
      vocab_size: total vocabulary; needs room for at least ``num_pairs`` distinct keys.
      seed: run seed.
      stream: ``TRAIN_STREAM`` or ``EVAL_STREAM`` (or any other integer for other splits).
    """

    batch_size: int
    seq_len: int
    num_pairs: int = 8
    vocab_size: int = 256
    seed: int = 0
    stream: int = TRAIN_STREAM

    def __post_init__(self):
        if self.num_pairs < 1:
            raise DataError(f"--num-pairs must be >= 1, got {self.num_pairs}", "--num-pairs")
        if 4 * self.num_pairs > self.seq_len + 1:
            raise DataError(
                f"MQAR with --num-pairs {self.num_pairs} needs --seq-len >= "
                f"{4 * self.num_pairs - 1} (pairs, then each key queried with its value), "
                f"got {self.seq_len}",
                "--seq-len",
            )
        _, keys, values = self.layout()
        if len(keys) < self.num_pairs or len(values) < 2:
            raise DataError(
                f"MQAR vocabulary --mqar-vocab {self.vocab_size} has {len(keys)} key tokens, too "
                f"few for --num-pairs {self.num_pairs} distinct keys",
                "--num-pairs",
            )

    def layout(self) -> tuple[range, range, range]:
        """Token ranges ``(noise, keys, values)``: noise is the first eighth (at least one
        token), keys and values split the rest in halves."""
        n_noise = max(1, self.vocab_size // 8)
        n_keys = (self.vocab_size - n_noise) // 2
        return (
            range(0, n_noise),
            range(n_noise, n_noise + n_keys),
            range(n_noise + n_keys, self.vocab_size),
        )

    def batch(self, index: int, rows=None) -> Batch:
        """Batch ``index``; ``rows`` (global row indices) selects rows of it. The rows share
        one generator, so the whole batch is generated (cheap) and then cut."""
        B, T, P = self.batch_size, self.seq_len, self.num_pairs
        rng = _rng(self.seed, self.stream, index)
        noise, keys_r, values_r = self.layout()
        # Distinct keys per row: the first P of a random permutation of the key range.
        keys = np.argsort(rng.random((B, len(keys_r))), axis=1)[:, :P] + keys_r.start
        values = rng.integers(values_r.start, values_r.stop, size=(B, P))
        seq = rng.integers(noise.start, noise.stop, size=(B, T + 1))
        seq[:, 0 : 2 * P : 2] = keys
        seq[:, 1 : 2 * P : 2] = values
        # Queries: P distinct two-token slots after the pairs, each "key value"; the slot order
        # is random, so the keys come back in random order at random positions.
        n_slots = (T + 1 - 2 * P) // 2
        slots = np.argsort(rng.random((B, n_slots)), axis=1)[:, :P]
        qpos = 2 * P + 2 * slots  # [B, P] position of each queried key in seq
        ri = np.arange(B)[:, None]
        seq[ri, qpos] = keys
        seq[ri, qpos + 1] = values
        mask = np.zeros((B, T), np.float32)
        mask[ri, qpos] = 1.0
        return _take({
            "inputs": seq[:, :-1].astype(np.int32),
            "targets": seq[:, 1:].astype(np.int32),
            "mask": mask,
        }, rows)


# ----------------------------------------------------------------------------------------------
# Needle in a haystack

# Repeated filler of the pass-key task.
_REPEATED = (
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
)

# Varied filler: written for this project; a fixed list so every run sees the same text.
_VARIED = (
    "The river bends twice before it reaches the old mill.",
    "Most of the village gathers in the square on market days.",
    "A cold wind came down from the hills late in the afternoon.",
    "She kept her notes in a green folder on the kitchen table.",
    "The train to the coast leaves a few minutes after eight.",
    "Nobody remembered who had planted the row of pear trees.",
    "He fixed the bicycle chain with a borrowed pair of pliers.",
    "The library closes early on the first Monday of the month.",
    "Clouds gathered over the bay, but the rain never came.",
    "Two ferries cross the strait every hour in the summer.",
    "The bakery on the corner sells out of rye bread by noon.",
    "An old map of the district hangs in the town hall.",
    "The children built a small dam across the stream.",
    "Her grandfather repaired clocks for more than forty years.",
    "The museum added a new room for maps and globes.",
    "A flock of starlings turned in the sky above the field.",
    "The committee met twice and agreed on nothing at all.",
    "Fresh snow covered the path to the upper meadow.",
    "The lighthouse keeper wrote a letter every Sunday evening.",
    "They painted the fence blue because the paint was cheap.",
    "The orchestra tuned their instruments for a long time.",
    "A narrow staircase led up to the attic room.",
    "The harvest was late that year because of the rain.",
    "Someone left a bag of apples by the garden gate.",
    "The new bridge shortened the walk to school by ten minutes.",
    "His first novel was about a sailor who feared the sea.",
    "The garden is quiet except for the bees in the lavender.",
    "Every spring the swallows return to the barn roof.",
    "The old radio still works if you hit it on the side.",
    "A long queue formed outside the theatre before the show.",
    "The recipe calls for three eggs and a pinch of salt.",
    "Fog rolled in from the harbour and hid the boats.",
    "The students argued about the meaning of the last chapter.",
    "A fox crossed the road just before the bus arrived.",
    "The teacher drew a large circle on the blackboard.",
    "The price of coffee went up again in the autumn.",
    "Most of the houses on the hill have red tile roofs.",
    "The dog waited by the door until everyone was home.",
    "A single candle lit the table during the storm.",
    "The mountain pass is closed from November to April.",
)

_KEY_WORDS = (
    "apple", "anchor", "basket", "candle", "castle", "copper", "desert", "dragon", "falcon",
    "forest", "garden", "glacier", "harbor", "island", "jacket", "kettle", "ladder", "lantern",
    "meadow", "mirror", "needle", "orchid", "pepper", "pillow", "pocket", "rabbit", "saddle",
    "silver", "spider", "summer", "thunder", "tomato", "tunnel", "velvet", "violin", "walnut",
    "window", "winter", "yellow", "zipper",
)  # fmt: skip


def _needle(key: str, value: str) -> str:
    return f"The special magic number for {key} is {value}. "


def _question(key: str) -> str:
    return f" What is the special magic number for {key}? The special magic number for {key} is "


def _value(variant: str, rng: np.random.Generator) -> str:
    if variant == "passkey":
        return str(rng.integers(10_000, 100_000))
    if variant == "number":
        return str(rng.integers(1_000_000, 10_000_000))
    h = "".join("0123456789abcdef"[d] for d in rng.integers(0, 16, size=32))
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


@dataclass(frozen=True)
class NIAH:
    """Single-needle retrieval on bytes; see the module docstring.

    Args:
      batch_size: B.
      seq_len: T (bytes); must leave room for the needle, the question and some filler.
      variant: one of ``NIAH_VARIANTS``.
      depth: needle depth in ``[0, 1]`` (0 = start of the haystack, 1 = just before the
        question), or ``None`` for a uniformly random depth per row (training).
      seed, stream: as for :class:`MQAR`.
    """

    batch_size: int
    seq_len: int
    variant: str = "passkey"
    depth: float | None = None
    seed: int = 0
    stream: int = TRAIN_STREAM
    vocab_size: int = 256

    def __post_init__(self):
        if self.variant not in NIAH_VARIANTS:
            raise DataError(
                f"unknown niah variant {self.variant!r}; choose from {', '.join(NIAH_VARIANTS)}",
                "--niah-variant",
            )
        if self.depth is not None and not 0.0 <= self.depth <= 1.0:
            raise DataError(f"needle depth must be in [0, 1], got {self.depth}", "--depth")
        need = self.min_seq_len(self.variant)
        if self.seq_len < need:
            raise DataError(
                f"niah ({self.variant}) needs --seq-len >= {need}, got {self.seq_len}",
                "--seq-len",
            )

    @staticmethod
    def min_seq_len(variant: str) -> int:
        longest = max(_KEY_WORDS, key=len)
        value = _value(variant, np.random.default_rng(0))
        return len(_needle(longest, value)) + len(_question(longest)) + len(value) + 32

    def _filler(self, rng: np.random.Generator, n: int) -> bytes:
        """Filler text of at least ``n`` bytes: the repeated paragraph (``passkey``) or random
        sentences from the built-in list."""
        out, size = [], 0
        while size < n:
            if self.variant == "passkey":
                s = _REPEATED
            else:
                s = _VARIED[rng.integers(len(_VARIED))] + " "
            out.append(s)
            size += len(s)
        return "".join(out).encode()

    def _row(self, rng: np.random.Generator) -> tuple[bytes, int]:
        T = self.seq_len
        key = _KEY_WORDS[rng.integers(len(_KEY_WORDS))]
        value = _value(self.variant, rng)
        needle, question = _needle(key, value).encode(), _question(key).encode()
        answer = value.encode()
        n_hay = T + 1 - len(needle) - len(question) - len(answer)
        depth = rng.random() if self.depth is None else self.depth
        # The needle sits exactly at the requested depth: the text before it is cut from the
        # front (so it ends on a sentence boundary, right before the needle), the text after it
        # is cut at the end.
        n_before = int(round(depth * n_hay))
        before = self._filler(rng, n_before)
        before = before[len(before) - n_before :] if n_before else b""
        after = self._filler(rng, n_hay - n_before)[: n_hay - n_before]
        seq = before + needle + after + question + answer
        assert len(seq) == T + 1, (len(seq), T)
        return seq, len(answer)

    def batch(self, index: int, rows=None) -> Batch:
        """Batch ``index``; ``rows`` selects rows of it (generated whole, as for MQAR)."""
        B, T = self.batch_size, self.seq_len
        rng = _rng(self.seed, self.stream, index)
        seq = np.zeros((B, T + 1), np.int32)
        mask = np.zeros((B, T), np.float32)
        for b in range(B):
            row, n_ans = self._row(rng)
            seq[b] = np.frombuffer(row, np.uint8)
            # Target position j predicts seq[j + 1]; the answer is the last n_ans bytes.
            mask[b, T - n_ans :] = 1.0
        return _take({"inputs": seq[:, :-1], "targets": seq[:, 1:], "mask": mask}, rows)


# ----------------------------------------------------------------------------------------------
# Text

BYTE_EOS = 256
BYTE_VOCAB = 257
_SKIP_DIRS = {"__pycache__", "site-packages", "dist-packages", "node_modules"}
# The file ``qdelta-tokenize`` writes beside its shards; a folder holding it (or any ``.bin``
# file) is read as token shards, not as text.
MANIFEST = "manifest.json"


def _iter_text_files(path: Path):
    """Yields ``(file, raw bytes)`` of a UTF-8 file or of every UTF-8 file under a folder
    (sorted, recursive; hidden entries, ``__pycache__`` and installed-package folders skipped;
    files that are not valid UTF-8 or contain NUL bytes skipped). Entries that are not regular
    files or cannot be read are skipped with one :class:`DataWarning` each kind, at the end."""
    if not path.is_dir():
        _check_regular(path)
        files = [path]
    else:
        files = []
        for root, dirs, names in os.walk(path):
            dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in _SKIP_DIRS)
            files += [Path(root) / n for n in sorted(names) if not n.startswith(".")]
    special, unreadable = [], []
    for f in files:
        try:
            # A named pipe, socket or device would block or never end: only regular files
            # (or links to them) are read.
            if not stat.S_ISREG(os.stat(f).st_mode):
                special.append(f)
                continue
            raw = f.read_bytes()
        except OSError as e:
            unreadable.append(f"{f} ({e.strerror or e})")
            continue
        if not raw or b"\x00" in raw:
            continue
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError:
            continue
        yield f, raw
    if special:
        warnings.warn(f"--data {path}: skipped {len(special)} entries that are not regular files "
                      f"(named pipes, sockets, devices): {', '.join(map(str, special[:3]))}"
                      f"{', ...' if len(special) > 3 else ''}", DataWarning, stacklevel=4)
    if unreadable:
        warnings.warn(f"--data {path}: skipped {len(unreadable)} unreadable files: "
                      f"{', '.join(unreadable[:3])}{', ...' if len(unreadable) > 3 else ''}",
                      DataWarning, stacklevel=4)


def _read_text_tree(path: Path) -> tuple[np.ndarray, int]:
    """The files of :func:`_iter_text_files` as one byte-token stream, ``BYTE_EOS`` after each
    document (file). Returns ``(tokens uint16, number of documents)``."""
    eos = np.array([BYTE_EOS], np.uint16)
    parts = []
    for _, raw in _iter_text_files(path):
        parts += [np.frombuffer(raw, np.uint8).astype(np.uint16), eos]
    if not parts:
        raise DataError(f"--data {path}: no UTF-8 text files found")
    return np.concatenate(parts), len(parts) // 2


def _tokenize_text_tree(path: Path, tok, eos_id: int) -> np.ndarray:
    """The documents of the text under ``path`` (one per file; one per line of a ``.jsonl``),
    tokenised with ``tok``, ``eos_id`` after each, as one stream."""
    from qdelta_jax.train import tokenize

    dtype = tokenize.shard_dtype(tokenize.vocab_size(tok))
    eos = np.array([eos_id], dtype)
    parts = []
    for f, raw in _iter_text_files(path):
        docs = list(tokenize.documents(f, raw.decode("utf-8"), flag="--data"))
        for ids in tokenize.encode(tok, docs):
            parts += [ids.astype(dtype), eos]
    if not parts:
        raise DataError(f"--data {path}: no UTF-8 text files found")
    return np.concatenate(parts)


def _check_regular(p: Path) -> None:
    try:
        mode = os.stat(p).st_mode
    except OSError as e:
        raise DataError(f"--data {p}: cannot be read ({e.strerror or e})") from None
    if not stat.S_ISREG(mode):
        raise DataError(f"--data {p}: not a regular file or folder (a named pipe, socket or "
                        "device); copy the data into a file")
    if not os.access(p, os.R_OK):
        raise DataError(f"--data {p}: permission denied; make it readable")


def _scan_ids(tokens: np.ndarray, path, eos_id: int | None) -> tuple[int, int, bool]:
    """Checks every id of a token file in one chunked pass (a memory map is never loaded
    whole); returns ``(smallest id, largest id, whether eos_id occurs)``."""
    lo_id, hi_id, has_eos, step = None, None, False, 1 << 24
    for lo in range(0, tokens.size, step):
        chunk = np.asarray(tokens[lo : lo + step])
        cmin, cmax = int(chunk.min()), int(chunk.max())
        if cmin < 0:
            i = lo + int(np.argmax(chunk < 0))
            raise DataError(f"--data {path}: token ids must be >= 0, found {int(tokens[i])} at "
                            f"position {i}")
        if cmax >= MAX_VOCAB:
            i = lo + int(np.argmax(chunk >= MAX_VOCAB))
            raise DataError(
                f"--data {path}: token id {int(tokens[i])} at position {i} is >= {MAX_VOCAB} "
                f"(the largest vocabulary supported); is the dtype right? (.bin is uint16, "
                f"*.u32.bin uint32, .npy as saved; this file reads as {tokens.dtype})")
        lo_id = cmin if lo_id is None else min(lo_id, cmin)
        hi_id = cmax if hi_id is None else max(hi_id, cmax)
        has_eos = has_eos or (eos_id is not None and bool(np.any(chunk == eos_id)))
    return lo_id, hi_id, has_eos


def _eos_missing(path, eos_id: int, lo_id: int, hi_id: int) -> DataError:
    return DataError(f"--data {path}: --eos-id {eos_id} never occurs in the file (ids "
                     f"{lo_id}..{hi_id}); pass the id that ends its documents, or leave "
                     "--eos-id out for one stream without boundaries", "--eos-id")


def _id_range(tokens: np.ndarray, path, eos_id: int | None) -> int:
    """:func:`_scan_ids` of one file; returns the vocabulary the ids need (max id + 1)."""
    lo_id, hi_id, has_eos = _scan_ids(tokens, path, eos_id)
    if eos_id is not None and not has_eos:
        raise _eos_missing(path, eos_id, lo_id, hi_id)
    return hi_id + 1


def _open_bin(p: Path, path) -> np.memmap:
    dtype = np.uint32 if p.name.endswith(".u32.bin") else np.uint16
    if p.stat().st_size % np.dtype(dtype).itemsize:
        raise DataError(f"--data {path}: size is not a multiple of {np.dtype(dtype).name}")
    return np.memmap(p, dtype=dtype, mode="r")


class ShardedTokens:
    """The ``.bin`` shards of a folder as one read-only 1-D token stream. Each shard is a
    memory map; a slice reads only the shards it touches, so the folder is never loaded whole.
    ``offsets[i]`` is where shard ``i`` starts in the stream (``offsets[-1]`` its size)."""

    ndim = 1

    def __init__(self, maps: list[np.ndarray]):
        self.maps = maps
        self.offsets = np.cumsum([0] + [m.size for m in maps])
        self.size = int(self.offsets[-1])
        self.shape = (self.size,)
        self.dtype = np.result_type(*(m.dtype for m in maps))

    def __len__(self) -> int:
        return self.size

    def __array__(self, dtype=None, copy=None):
        return np.concatenate([np.asarray(m) for m in self.maps]).astype(dtype or self.dtype)

    def __getitem__(self, key):
        if isinstance(key, (int, np.integer)):
            i = int(key) + (self.size if key < 0 else 0)
            s = int(np.searchsorted(self.offsets, i, side="right")) - 1
            return self.maps[s][i - self.offsets[s]]
        if not isinstance(key, slice) or key.step not in (None, 1):
            raise TypeError("ShardedTokens takes an index or a contiguous slice")
        lo, hi, _ = key.indices(self.size)
        parts = []
        s = int(np.searchsorted(self.offsets, lo, side="right")) - 1
        while lo < hi and s < len(self.maps):
            a, b = lo - self.offsets[s], min(hi, self.offsets[s + 1]) - self.offsets[s]
            parts.append(np.asarray(self.maps[s][a:b]).astype(self.dtype, copy=False))
            lo, s = self.offsets[s] + b, s + 1
        return np.concatenate(parts) if parts else np.zeros(0, self.dtype)


def read_manifest(folder: str | os.PathLike) -> dict | None:
    """The ``manifest.json`` that ``qdelta-tokenize`` wrote into a shard folder, or ``None``."""
    p = Path(folder) / MANIFEST
    if not p.is_file():
        return None
    try:
        m = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise DataError(f"--data {folder}: {MANIFEST} cannot be read ({e}); rerun "
                        "qdelta-tokenize or delete it") from None
    if not isinstance(m, dict) or not isinstance(m.get("shards"), list):
        raise DataError(f"--data {folder}: {MANIFEST} is not a qdelta-tokenize manifest")
    return m


def is_shard_folder(path: str | os.PathLike) -> bool:
    """A folder of token shards: it holds a ``manifest.json`` or a ``.bin`` file (top level)."""
    p = Path(path)
    return p.is_dir() and ((p / MANIFEST).is_file() or any(p.glob("*.bin")))


def tokenizer_file(data: str | os.PathLike | None, tokenizer=None) -> Path | None:
    """The tokenizer of a text source: ``tokenizer`` when given, else the copy that
    ``qdelta-tokenize`` left in a shard folder (named in its manifest), else ``None``."""
    if tokenizer is not None:
        return Path(tokenizer)
    if data is None or not is_shard_folder(data):
        return None
    m = read_manifest(data)
    name = (m or {}).get("tokenizer_file")
    return Path(data) / name if isinstance(name, str) and (Path(data) / name).is_file() else None


def _open_shards(p: Path, eos_id: int | None, manifest: dict | None):
    """The shards of a folder (every top-level ``*.bin``, sorted by name, ``*.u32.bin`` as
    uint32), each range-checked; with a manifest, each must hold the token count it lists (a
    cut-off write is caught here, not as a silent change of data)."""
    files = sorted(f for f in p.glob("*.bin") if not f.name.startswith("."))
    if not files:
        raise DataError(f"--data {p}: a shard folder ({MANIFEST}) without .bin shards")
    if manifest is not None:
        listed = {s.get("file"): s.get("tokens") for s in manifest["shards"]
                  if isinstance(s, dict)}
        missing = sorted(set(listed) - {f.name for f in files})
        if missing:
            raise DataError(f"--data {p}: shards listed in {MANIFEST} are missing: "
                            f"{', '.join(map(str, missing[:3]))}")
    maps, lo_id, hi_id, has_eos = [], None, None, False
    for f in files:
        _check_regular(f)
        m = _open_bin(f, f)
        if manifest is not None and f.name in listed and listed[f.name] != m.size:
            raise DataError(f"--data {f}: holds {m.size} tokens, {MANIFEST} says "
                            f"{listed[f.name]} (an interrupted write?); rerun qdelta-tokenize")
        if m.size == 0:
            continue
        a, b, e = _scan_ids(m, f, eos_id)
        lo_id = a if lo_id is None else min(lo_id, a)
        hi_id = b if hi_id is None else max(hi_id, b)
        has_eos = has_eos or e
        maps.append(m)
    if not maps:
        raise DataError(f"--data {p}: fewer than 2 tokens")
    if eos_id is not None and not has_eos:
        raise _eos_missing(p, eos_id, lo_id, hi_id)
    return ShardedTokens(maps), hi_id + 1


def load_tokens(path: str | os.PathLike, eos_id: int | None = None, tokenizer=None):
    """Opens a text source. Returns ``(tokens, eos_id, vocab_size)``: a 1-D integer array (a
    memory map for ``.npy``/``.bin``, a :class:`ShardedTokens` for a shard folder), the id that
    ends each document (``None``: one stream with no boundaries) and the vocabulary the model
    needs.

    ``tokenizer`` (a ``tokenizers`` JSON file) tokenises text with it instead of bytes; its
    vocabulary is then the model's and its end-of-document token the ``eos_id`` (``eos_id``
    overrides it). A shard folder written by ``qdelta-tokenize`` takes both from its manifest.
    Otherwise the vocabulary of pre-tokenised files is max id + 1."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"--data {path}: no such file or directory")
    if eos_id is not None and not 0 <= eos_id < MAX_VOCAB:
        raise DataError(f"--eos-id must be in [0, {MAX_VOCAB}), got {eos_id}", "--eos-id")
    manifest = read_manifest(p) if is_shard_folder(p) else None
    if manifest is not None and eos_id is None:
        eos_id = manifest.get("eos_id")
    tok_vocab = None
    if tokenizer is not None:
        from qdelta_jax.train import tokenize

        tok = tokenize.load_tokenizer(tokenizer)
        tok_vocab = tokenize.vocab_size(tok)
        eos_id = tokenize.find_eos(tok, tokenizer, eos_id)
    elif manifest is not None:
        tok_vocab = manifest.get("vocab_size")
    if p.suffix in (".npy", ".bin") and not p.is_dir():
        _check_regular(p)
    if p.is_file() and p.suffix == ".npy":
        try:
            tokens = np.load(p, mmap_mode="r")
        except (ValueError, OSError, EOFError) as e:
            raise DataError(f"--data {path}: not a readable .npy file ({e})") from None
        if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
            raise DataError(
                f"--data {path}: a .npy token file must be 1-D integer, got {tokens.dtype} "
                f"{tokens.shape}"
            )
    elif p.is_file() and p.suffix == ".bin":
        tokens = _open_bin(p, path)
    elif is_shard_folder(p):
        tokens, vocab = _open_shards(p, eos_id, manifest)
        if tokens.size < 2:
            raise DataError(f"--data {path}: fewer than 2 tokens")
        return tokens, eos_id, _fit_vocab(vocab, tok_vocab, path)
    elif tokenizer is not None:
        return _tokenize_text_tree(p, tok, eos_id), eos_id, tok_vocab
    else:
        if eos_id is not None:
            raise DataError(f"--eos-id applies to .bin/.npy token files; text ({path}) ends each "
                            f"document with the byte-level id {BYTE_EOS}", "--eos-id")
        tokens, _ = _read_text_tree(p)
        return tokens, BYTE_EOS, BYTE_VOCAB
    if tokens.size < 2:
        raise DataError(f"--data {path}: fewer than 2 tokens")
    vocab = _id_range(tokens, path, eos_id)  # one pass over the file, once per run
    return tokens, eos_id, _fit_vocab(vocab, tok_vocab, path)


def _fit_vocab(needed: int, tok_vocab: int | None, path) -> int:
    if tok_vocab is None:
        return needed
    if needed > tok_vocab:
        raise DataError(f"--data {path}: holds token id {needed - 1}, outside the tokenizer's "
                        f"vocabulary of {tok_vocab}; were the shards made with another "
                        "tokenizer?", "--tokenizer")
    return int(tok_vocab)


def text_byte_counter(data, tokenizer=None):
    """``count(targets, mask) -> int``, the UTF-8 bytes of the text the masked targets decode
    to (for bits per byte), or ``None`` when the source has no text to count (pre-tokenised
    ids without a tokenizer). Byte-level text: one byte per id below 256 (the end-of-document
    id has none). With a tokenizer: each run of consecutive masked targets of a row is decoded
    (special tokens skipped) and its bytes counted."""
    tok_path = tokenizer_file(data, tokenizer)
    if tok_path is not None:
        from qdelta_jax.train import tokenize

        tok = tokenize.load_tokenizer(tok_path)

        def count(targets, mask):
            runs = []
            for t, m in zip(np.asarray(targets), np.asarray(mask)):
                idx = np.flatnonzero(m > 0)
                if idx.size:
                    runs += [t[s].tolist() for s in np.split(idx, np.flatnonzero(np.diff(idx) > 1)
                                                             + 1)]
            texts = tok.decode_batch(runs, skip_special_tokens=True) if runs else []
            return sum(len(s.encode("utf-8")) for s in texts)

        return count
    if data is not None and not is_shard_folder(data) and Path(data).suffix not in (".bin",
                                                                                    ".npy"):
        return lambda targets, mask: int(np.sum((np.asarray(targets) < BYTE_EOS)
                                                & (np.asarray(mask) > 0)))
    return None


class TextData:
    """Packed rows of a token stream; see the module docstring.

    Args:
      tokens, eos_id: from :func:`load_tokens`.
      batch_size, seq_len: B, T.
      max_segments: S, documents a row can hold in ``cu_seqlens``; beyond that the last
        boundaries of a row are dropped (the state then does not reset there; the targets that
        cross those boundaries stay masked).
      split: ``"train"`` (shuffled rows, wraps around in epochs) or ``"eval"`` (held-out rows).
    """

    def __init__(
        self,
        tokens: np.ndarray,
        eos_id: int | None,
        batch_size: int,
        seq_len: int,
        *,
        max_segments: int = 32,
        seed: int = 0,
        split: str = "train",
        vocab_size: int | None = None,
        byte_counter=None,
    ):
        self.tokens, self.eos_id = tokens, eos_id
        self.byte_counter = byte_counter
        self.batch_size, self.seq_len, self.seed, self.split = batch_size, seq_len, seed, split
        self.max_segments = max(1, int(max_segments))
        self.vocab_size = vocab_size
        n_rows = (tokens.size - 1) // seq_len
        n_eval = max(batch_size, n_rows // 100)
        if n_rows < batch_size + n_eval:
            raise DataError(
                f"--data has {tokens.size} tokens: too few for one training and one evaluation "
                f"batch of {batch_size} x {seq_len} tokens; lower --batch-size or --seq-len"
            )
        self.n_train = n_rows - n_eval
        self.rows = np.arange(self.n_train) if split == "train" else np.arange(self.n_train, n_rows)
        # Document starts (the token after each eos), for cu_seqlens; computed in chunks so a
        # memory-mapped file is never loaded whole.
        if eos_id is None:
            self.starts = np.zeros(0, np.int64)
        else:
            found, step = [], 1 << 24
            for lo in range(0, tokens.size, step):
                found.append(np.flatnonzero(np.asarray(tokens[lo : lo + step]) == eos_id) + lo + 1)
            self.starts = np.concatenate(found)
        # Shard boundaries are document boundaries too (a shard need not end with an eos).
        if isinstance(tokens, ShardedTokens):
            self.starts = np.union1d(self.starts, tokens.offsets[1:-1]).astype(np.int64)

    def _row_ids(self, index: int) -> np.ndarray:
        B, n = self.batch_size, len(self.rows)
        if self.split != "train":
            return self.rows[(index * B + np.arange(B)) % n]
        pos = index * B + np.arange(B)
        out = np.empty(B, np.int64)
        for epoch in np.unique(pos // n):
            perm = _rng(self.seed, TRAIN_STREAM, int(epoch), salt=1).permutation(n)
            sel = pos // n == epoch
            out[sel] = self.rows[perm[pos[sel] % n]]
        return out

    def batch(self, index: int, rows=None) -> Batch:
        """Batch ``index``; ``rows`` (global row indices) reads only those rows of it from the
        file (each process of a multi-host run reads its own share)."""
        ids = self._row_ids(index)
        if rows is not None:
            ids = ids[np.asarray(rows)]
        B, T, S = len(ids), self.seq_len, self.max_segments
        seq = np.zeros((B, T + 1), np.int32)
        mask = np.ones((B, T), np.float32)
        cu = np.full((B, S + 1), T, np.int32)
        cu[:, 0] = 0
        for b, r in enumerate(ids):
            lo = int(r) * T
            seq[b] = np.asarray(self.tokens[lo : lo + T + 1], dtype=np.int32)
            # Documents starting inside the row (offsets 1..T; T: the last target starts one).
            i0, i1 = np.searchsorted(self.starts, [lo + 1, lo + T + 1])
            offs = self.starts[i0:i1] - lo
            # Input position o - 1 ends a document (its eos, or a shard's last token); its
            # target, the first token of the next document, is not predictable from it.
            mask[b, offs - 1] = 0.0
            offs = offs[offs < T][: S - 1]
            cu[b, 1 : 1 + len(offs)] = offs
        if self.eos_id is not None:
            # The last input token of a row may be an eos whose target starts a new document.
            mask[seq[:, T - 1] == self.eos_id, T - 1] = 0.0
        return {
            "inputs": seq[:, :-1],
            "targets": seq[:, 1:],
            "mask": mask,
            "cu_seqlens": cu,
        }

    def target_bytes(self, batch: Batch) -> int | None:
        """UTF-8 bytes of the text that the masked targets of ``batch`` decode to (see
        :func:`text_byte_counter`), or ``None`` when the source has no byte count."""
        if self.byte_counter is None:
            return None
        return int(self.byte_counter(batch["targets"], batch["mask"]))


# ----------------------------------------------------------------------------------------------
# Construction and iteration


def make_source(
    task: str,
    *,
    batch_size: int,
    seq_len: int,
    seed: int,
    split: str = "train",
    num_pairs: int = 8,
    mqar_vocab: int = 256,
    niah_variant: str = "passkey",
    depth: float | None = None,
    data: str | None = None,
    eos_id: int | None = None,
    text_tokens: Any = None,
    tokenizer: str | None = None,
):
    """Builds the data source of a run. ``split`` is ``"train"`` or ``"eval"``; ``text_tokens``
    reuses an already opened ``load_tokens`` result; ``tokenizer`` is a ``tokenizers`` JSON file
    for text (see :func:`load_tokens`)."""
    if batch_size < 1 or seq_len < 2:
        raise DataError("--batch-size must be >= 1 and --seq-len >= 2", "--batch-size")
    stream = TRAIN_STREAM if split == "train" else EVAL_STREAM
    if task == "mqar":
        return MQAR(batch_size, seq_len, num_pairs, mqar_vocab, seed, stream)
    if task == "niah":
        return NIAH(batch_size, seq_len, niah_variant, depth, seed, stream)
    if task == "text":
        if data is None and text_tokens is None:
            raise DataError("--task text needs --data PATH (a text file or folder, .bin or .npy)")
        tokens, eos, vocab = (text_tokens if text_tokens is not None
                              else load_tokens(data, eos_id, tokenizer))
        return TextData(tokens, eos, batch_size, seq_len, seed=seed, split=split, vocab_size=vocab,
                        byte_counter=text_byte_counter(data, tokenizer))
    raise DataError(f"unknown task {task!r}; choose from {', '.join(TASKS)}", "--task")


def _take(batch: Batch, rows) -> Batch:
    return batch if rows is None else {k: v[np.asarray(rows)] for k, v in batch.items()}


class DataIterator:
    """Iterates a source from a saved position. ``state_dict()`` is ``{"index": n}``, the number
    of batches already drawn; ``load_state_dict`` continues from there. ``rows`` (global row
    indices) draws only those rows of every batch."""

    def __init__(self, source, index: int = 0, rows=None):
        self.source, self.index, self.rows = source, int(index), rows

    def __iter__(self):
        return self

    def __next__(self) -> Batch:
        batch = self.source.batch(self.index, self.rows)
        self.index += 1
        return batch

    def state_dict(self) -> dict[str, int]:
        return {"index": self.index}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.index = int(state["index"])


def fingerprint(batch: Batch) -> int:
    """A cheap checksum of a batch (for tests and debugging)."""
    return zlib.crc32(b"".join(np.ascontiguousarray(batch[k]).tobytes() for k in sorted(batch)))
