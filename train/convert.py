"""``qdelta-convert``: the authors' Hugging Face folders to parameters for training here, and back.

::

    qdelta-convert from-hf HF_DIR OUT_DIR [--param-dtype float32|bfloat16]
    qdelta-convert to-hf RUN_DIR OUT_DIR [--step N] [--param-dtype ...] [--hf-config PATH]
                         [--max-shard-size 5GB] [--overwrite]

``from-hf`` reads an HF model folder of the authors' ``QDeltaForCausalLM`` (``config.json`` and
``model.safetensors`` or sharded safetensors) and writes a params directory
(:mod:`qdelta_jax.train.params`) that ``qdelta-train --init-from OUT_DIR`` starts from.
``to-hf`` writes the parameters of a ``qdelta-train`` run directory (its newest checkpoint not
marked bad, or ``--step``) or of a params directory as an HF folder with the authors' names and
layouts. The HF metadata keys of ``config.json`` (token ids, ``max_position_embeddings``, ...)
come from ``--hf-config`` (an HF ``config.json`` or its folder), else from the HF folder the
run was started from (recorded by ``from-hf`` and ``--init-from``), else the authors' defaults.

Nothing existing is overwritten without ``--overwrite`` (``from-hf`` never overwrites). Bad
input exits with status 2 and one line naming it; a file-system failure with 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
from pathlib import Path

PROG = "qdelta-convert"
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20,
          "GIB": 2**30}


class ConvertError(ValueError):
    """A bad argument or input, as one line."""


def parse_size(text: str) -> int:
    """``"5GB"``, ``"500MB"``, ``"2GiB"`` or a number of bytes -> bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", str(text), re.IGNORECASE)
    if not m or float(m[1]) <= 0:
        raise argparse.ArgumentTypeError(f"expected a size such as 5GB, 500MB or 1000000, got "
                                         f"{text!r}")
    return int(float(m[1]) * _UNITS[(m[2] or "").upper()])


def from_hf(hf_dir: str, out_dir: str, *, param_dtype: str | None = None, log=print) -> Path:
    """HF folder -> params directory; returns ``out_dir``."""
    from qdelta_jax import hf
    from qdelta_jax.model import count_params
    from qdelta_jax.train import params

    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConvertError(f"OUT_DIR {out} already exists and is not an empty folder; choose a "
                           "new one (nothing was written)")
    log(f"reading {hf_dir}")
    _, meta = hf.read_hf_config(Path(hf_dir))
    model = hf.from_hf(hf_dir, param_dtype=param_dtype)
    c = model.config
    log(f"  {count_params(c):,} parameters, {c.num_hidden_layers} layers, hidden "
        f"{c.hidden_size}, {c.num_heads} heads x {c.head_dim}, vocab {c.vocab_size}, "
        f"{c.param_dtype}")
    params.save_params(out, model, source=str(Path(hf_dir).absolute()), hf_config=meta)
    log(f"wrote {out}; train from it with: qdelta-train --init-from {out} --run-dir RUN_DIR ...")
    return out


def hf_metadata_of(run_dir: Path, hf_config: str | None, log=print) -> dict:
    """The HF metadata keys for an export of ``run_dir`` (see the module docstring)."""
    from qdelta_jax import hf
    from qdelta_jax.train import checkpoint as ckpt

    if hf_config is not None:
        _, meta = hf.read_hf_config(hf_config)
        log(f"  HF metadata keys from {hf_config}")
        return meta
    seen = set()
    d = run_dir
    while d is not None and d.resolve() not in seen:
        seen.add(d.resolve())
        saved = ckpt.read_run_config(d) or {}
        if isinstance(saved.get("hf_config"), dict):
            log(f"  HF metadata keys from {saved.get('source') or d}")
            return saved["hf_config"]
        nxt = (saved.get("train") or {}).get("init_from")
        d = Path(nxt) if nxt and Path(nxt).is_dir() else None
    log("  HF metadata keys: the authors' defaults (pass --hf-config to set them)")
    return {}


def to_hf(run_dir: str, out_dir: str, *, step: int | None = None, param_dtype: str | None = None,
          hf_config: str | None = None, max_shard_size: int | None = None,
          overwrite: bool = False, log=print) -> Path:
    """Run or params directory -> HF folder; returns ``out_dir``."""
    from qdelta_jax import hf
    from qdelta_jax.model import DTYPES
    from qdelta_jax.train import params

    src = Path(run_dir)
    log(f"reading {src}" + (f" step {step}" if step is not None else ""))
    config = params.read_model_config(src)
    if param_dtype is not None:
        if param_dtype not in DTYPES:
            raise ConvertError(f"--param-dtype must be one of {', '.join(DTYPES)}, got "
                               f"{param_dtype!r}")
        config = dataclasses.replace(config, param_dtype=param_dtype)
    # Refuse what the authors' model cannot hold before reading any array.
    try:
        hf.config_to_hf(config)
    except ValueError as e:
        raise ConvertError(f"RUN_DIR {src}: {e}") from None
    meta = hf_metadata_of(src, hf_config, log)
    got, tree = params.restore_params(src, config, step=step, flag="--step" if step else "RUN_DIR")
    from flax import nnx

    from qdelta_jax.model import QDeltaLM

    graphdef, state = nnx.split(nnx.eval_shape(lambda: QDeltaLM(config, rngs=nnx.Rngs(0))))
    nnx.replace_by_pure_dict(state, tree)
    model = nnx.merge(graphdef, state)
    kw = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    out = hf.to_hf(model, out_dir, extra_config=meta, overwrite=overwrite, **kw)
    files = sorted(p.name for p in out.iterdir() if p.suffix in (".json", ".safetensors"))
    log(f"wrote {out} from step {got}: {', '.join(files)}")
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Convert the authors' Hugging Face "
                                "Q-Delta folders to qdelta-train parameters, and runs back.")
    sub = p.add_subparsers(dest="command", required=True, metavar="{from-hf,to-hf}")
    a = sub.add_parser("from-hf", help="HF folder -> params directory for qdelta-train "
                       "--init-from")
    a.add_argument("hf_dir", metavar="HF_DIR")
    a.add_argument("out_dir", metavar="OUT_DIR")
    a.add_argument("--param-dtype", choices=("float32", "bfloat16"),
                   help="parameter dtype (default: the stored one; float16 becomes float32)")
    b = sub.add_parser("to-hf", help="run or params directory -> HF folder")
    b.add_argument("run_dir", metavar="RUN_DIR")
    b.add_argument("out_dir", metavar="OUT_DIR")
    b.add_argument("--step", type=int, help="the checkpoint step (default: the newest not "
                   "marked bad)")
    b.add_argument("--param-dtype", choices=("float32", "bfloat16"),
                   help="dtype of the written tensors (default: the run's parameter dtype)")
    b.add_argument("--hf-config", metavar="PATH", help="an HF config.json (or its folder) whose "
                   "metadata keys (token ids, ...) to write")
    b.add_argument("--max-shard-size", type=parse_size, metavar="SIZE",
                   help="largest safetensors file, e.g. 5GB (the default) or 500MB")
    b.add_argument("--overwrite", action="store_true", help="replace a model already in OUT_DIR")
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    from qdelta_jax.train import checkpoint as ckpt

    try:
        with ckpt.quiet_orbax_logs():
            if a.command == "from-hf":
                from_hf(a.hf_dir, a.out_dir, param_dtype=a.param_dtype)
            else:
                if a.step is not None and a.step < 0:
                    raise ConvertError(f"--step must be a saved step >= 0, got {a.step}")
                to_hf(a.run_dir, a.out_dir, step=a.step, param_dtype=a.param_dtype,
                      hf_config=a.hf_config, max_shard_size=a.max_shard_size,
                      overwrite=a.overwrite)
    except (ValueError, ImportError, FileNotFoundError, FileExistsError) as e:
        print(f"{PROG}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"{PROG}: error: {e.strerror or e} ({e.filename or 'file system'})",
              file=sys.stderr)
        return 1
    return 0


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


if __name__ == "__main__":
    sys.exit(main())
