"""``qdelta-generate RUN_DIR PROMPT``: text generation from a ``qdelta-train`` run.

Restores the run's latest good checkpoint (as ``qdelta-eval`` does), encodes the prompt, prefills
it in one step and streams the continuation to stdout one token at a time: each token is one
compiled program (the model's step with a donated cache, and the sampling). Text that does not
yet form a whole UTF-8 character is held back until it does; invalid sequences print as U+FFFD.

Runs trained with ``--tokenizer`` (or on a ``qdelta-tokenize`` folder) hold the tokenizer as
``RUN_DIR/tokenizer.json``: the prompt is encoded with it, the continuation decoded with it
(special tokens not printed), and ``--eos-id`` defaults to the run's end-of-document id.

Other runs are byte level (the prompt's UTF-8 bytes are the ids 0-255): ``--task text`` on UTF-8
files (ids 0-255 the bytes, 256 the end-of-document
token, the default ``--eos-id`` of such runs; the vocabulary is padded beyond it) and niah.
Generated ids above 255 print nothing. Generation stops at ``--max-new-tokens`` or after
``--eos-id``. With the same ``--seed`` the
tokens are those of :func:`qdelta_jax.model.generate` for the same prompt and key.
"""

from __future__ import annotations

import argparse
import codecs
import math
import sys
from pathlib import Path

from qdelta_jax.train.checkpoint import RunDirError
from qdelta_jax.train.data import BYTE_EOS
from qdelta_jax.train.options import UsageError
from qdelta_jax.train.params import load_run

PROG = "qdelta-generate"
BYTES = 256


def _check_options(a) -> None:
    if a.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be >= 1, got {a.max_new_tokens}",
                         "--max-new-tokens")
    if not math.isfinite(a.temperature) or a.temperature < 0:
        raise UsageError(f"--temperature must be >= 0 (0 = greedy), got {a.temperature}",
                         "--temperature")
    if not 0.0 < a.top_p <= 1.0:
        raise UsageError(f"--top-p must be in (0, 1], got {a.top_p}", "--top-p")
    if not a.prompt:
        raise UsageError("PROMPT must not be empty", "PROMPT")


def _check_run(a, run_args, vocab: int, tokenizer=None) -> None:
    if tokenizer is not None:
        if a.eos_id is not None and not 0 <= a.eos_id < vocab:
            raise UsageError(f"--eos-id must be in [0, {vocab}), the run's vocabulary, got "
                             f"{a.eos_id}", "--eos-id")
        return
    data = str(run_args.data or "") if run_args is not None else ""
    if run_args is not None and run_args.task == "text" and data.endswith(".npy"):
        raise UsageError(f"RUN_DIR was trained on pre-tokenised ids ({data}), not bytes; "
                         "qdelta-generate is byte level", "RUN_DIR")
    if vocab < BYTES:
        raise UsageError(f"RUN_DIR's model has a vocabulary of {vocab}, fewer than the 256 "
                         "bytes that byte-level generation needs", "RUN_DIR")
    if a.eos_id is not None and not 0 <= a.eos_id < vocab:
        raise UsageError(f"--eos-id must be in [0, {vocab}), the run's vocabulary, got "
                         f"{a.eos_id}", "--eos-id")


def _run_tokenizer(saved):
    """The tokenizer of a text run (``RUN_DIR/tokenizer.json``), else ``None`` (byte level)."""
    from qdelta_jax.train.data import DataError
    from qdelta_jax.train.tokenize import load_tokenizer

    if saved.tokenizer is None or saved.options is None or saved.options.task != "text":
        return None
    try:
        return load_tokenizer(saved.tokenizer, flag="RUN_DIR")
    except DataError as e:
        raise UsageError(str(e), "RUN_DIR") from None


def _eos_of(tok, run_dir: Path, run_args) -> int:
    """The run's end-of-document id: its ``--eos-id``, a shard folder's manifest's, or the
    tokenizer's."""
    from qdelta_jax.train.data import DataError, is_shard_folder, read_manifest
    from qdelta_jax.train.tokenize import TOKENIZER_COPY, find_eos

    eos = run_args.eos_id
    try:
        if eos is None and run_args.data and is_shard_folder(run_args.data):
            eos = (read_manifest(run_args.data) or {}).get("eos_id")
        return find_eos(tok, run_dir / TOKENIZER_COPY, eos, flag="RUN_DIR")
    except DataError as e:
        raise UsageError(str(e), e.flag) from None


def stream(model, prompt_ids: list[int], *, max_new_tokens: int, temperature: float,
           top_p: float, seed: int, eos_id: int | None, write) -> list[int]:
    """Prefills ``prompt_ids`` and generates, calling ``write(token)`` after each new token;
    returns the new tokens (the last one ``eos_id`` if it stopped there)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from qdelta_jax.model import _sample, compiled_step

    graphdef, state = nnx.split(model)
    sample = jax.jit(lambda logits, key: _sample(
        logits, key, temperature, None, None if top_p == 1.0 else top_p))

    def _next(state, tok, cache, key):
        logits, cache = nnx.merge(graphdef, state).step(tok[:, None], cache)
        return sample(logits[:, 0], key), cache

    step = jax.jit(_next, donate_argnums=(2,))
    keys = jax.random.split(jax.random.key(seed), max_new_tokens)
    logits, cache = compiled_step(model)(jnp.asarray([prompt_ids], jnp.int32),
                                         model.init_cache(1))
    tok = sample(logits[:, -1], keys[0])
    out = []
    for i in range(max_new_tokens):
        t = int(tok[0])
        out.append(t)
        write(t)
        if t == eos_id or i + 1 == max_new_tokens:
            break
        tok, cache = step(state, tok, cache, keys[i + 1])
    return out


def _tokenizer_writer(tok, out):
    """``(write(token), finish())`` printing the decoded continuation as it grows: the whole
    continuation is decoded after each token (a token's text can depend on its neighbours) and
    only the text beyond what is already printed is written, held back while it ends inside a
    UTF-8 character. (A decoder that rewrites earlier text leaves that part as first printed.)"""
    ids: list[int] = []
    shown = [0]  # characters printed

    def flush(final: bool):
        text = tok.decode(ids, skip_special_tokens=True)
        new = text[shown[0]:]
        if new and (final or not new.endswith("\ufffd")):
            out.write(new)
            out.flush()
            shown[0] = len(text)

    def write(t: int):
        ids.append(t)
        flush(False)

    return write, lambda: flush(True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=PROG, description="Generate text from a qdelta-train run "
                                "directory (with its tokenizer, else byte level); the "
                                "continuation is streamed.")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("prompt", metavar="PROMPT", help="prompt text (UTF-8)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eos-id", type=int, default=None,
                   help="stop after this token (default: the run's end-of-document token for "
                   "--task text runs: 256 at byte level, else the tokenizer's; else none)")
    p.add_argument("--implementation", choices=["reference", "xla", "pallas"], default=None,
                   help="override the run's qdelta_rule implementation")
    a = p.parse_args(argv)
    out = sys.stdout
    try:
        _check_options(a)
        try:
            saved = load_run(a.run_dir, implementation=a.implementation)
        except RunDirError as e:
            raise UsageError(str(e), "RUN_DIR") from None
        model, run_args = saved.model(), saved.options
        tok = _run_tokenizer(saved)
        _check_run(a, run_args, model.config.vocab_size, tok)
        if tok is not None:
            from qdelta_jax.train import tokenize

            if a.eos_id is None:
                a.eos_id = _eos_of(tok, Path(a.run_dir), run_args)
            prompt = tokenize.encode(tok, [a.prompt])[0].tolist()
            if not prompt:
                raise UsageError("PROMPT encodes to no tokens", "PROMPT")
            if max(prompt) >= model.config.vocab_size:
                raise UsageError(f"PROMPT encodes to id {max(prompt)}, outside the model's "
                                 f"vocabulary of {model.config.vocab_size}", "PROMPT")
            write, finish = _tokenizer_writer(tok, out)
        else:
            if a.eos_id is None and run_args is not None and run_args.task == "text":
                a.eos_id = BYTE_EOS
            prompt = list(a.prompt.encode("utf-8"))
            decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

            def write(t: int):
                if t < BYTES:
                    out.write(decoder.decode(bytes([t])))
                    out.flush()

            def finish():
                out.write(decoder.decode(b"", final=True))

        stream(model, prompt, max_new_tokens=a.max_new_tokens, temperature=a.temperature,
               top_p=a.top_p, seed=a.seed, eos_id=a.eos_id, write=write)
        finish()
        out.write("\n")
        out.flush()
    except UsageError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
