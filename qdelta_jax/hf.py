"""The authors' Hugging Face checkpoints in and out: :func:`from_hf` and :func:`to_hf`.

The authors of Q-Delta ship a PyTorch model for the Hugging Face ``transformers`` library
(``QDeltaForCausalLM``, built on flash-linear-attention). A model folder holds ``config.json``
(their config keys) and ``model.safetensors``, or shards ``model-0000k-of-0000n.safetensors``
listed in ``model.safetensors.index.json``. :func:`from_hf` reads such a folder into a
:class:`qdelta_jax.model.QDeltaLM`, :func:`to_hf` writes one back with the same tensor names,
shapes and dtypes, so weights trained with either code base load in the other.

Why the logits differ from the authors' shipped model: ``from_hf(path)`` computes the function
the weights define (the recurrence of docs/MATH.md section 1, in every mode). The authors'
chunked kernel puts the read vector ``x`` on the wrong index of its intra-chunk matrix, so their
model computes something else whenever ``lam > 0``: on the tiny test models the two differ by
about 6% (relative) and, with grouped value heads and ``allow_neg_eigval``, by about 60%.

No PyTorch is needed: tensors go through the ``safetensors`` package's NumPy API, an optional
extra (``pip install "qdelta-jax[hf]"``). bfloat16 tensors are read and written through
``ml_dtypes`` (a JAX dependency).

Config keys (:func:`config_from_hf`): every key the authors' ``QDeltaConfig`` writes is either
used (the sizes, ``use_gate``, ``use_short_conv``, ``conv_size``, ``num_v_heads``,
``expand_v``, ``allow_neg_eigval``, ``lamb_bias``, ``hidden_ratio``, ``intermediate_size``,
``norm_eps``, ``tie_word_embeddings``, ``initializer_range``), checked (``model_type`` must be
``"qdelta"``, ``attn`` null: no hybrid attention layers, ``hidden_act`` SiLU, ``attn_mode`` one
of the authors' two), or kept as metadata that does not change the function (token ids,
``max_position_embeddings``, the authors' kernel-fusion switches, ``transformers_version``, ...):
:func:`read_hf_config` returns those so :func:`to_hf` can write them back. Any other key raises
``ValueError`` naming it.

Name map: :data:`NAME_MAP` is the one table of the authors' tensor names, our parameter paths
and the layout change between them (``nn.Linear.weight [out, in]`` is our ``kernel [in, out]``;
a depthwise ``Conv1d.weight [E, 1, W]`` is our ``ShortConv.kernel [W, E]``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qdelta_jax.model import DTYPES, QDeltaConfig, QDeltaLM

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# transformers' own default shard size (5 GB): one file up to that size, shards beyond it.
MAX_SHARD_SIZE = 5 * 10**9

# ----------------------------------------------------------------------------- the name map

# (authors' tensor name, our parameter path, layout). ``{i}`` is the layer index. A row is used
# when the model has that parameter (g_proj only with use_gate, the convs only with
# use_short_conv, lm_head only without tied embeddings). Layouts: "copy" (same array), "linear"
# (torch [out, in] <-> ours [in, out]), "conv" (torch [E, 1, W] <-> ours [W, E]).
NAME_MAP: tuple[tuple[str, tuple[Any, ...], str], ...] = (
    ("model.embeddings.weight", ("embed", "embedding"), "copy"),
    ("model.layers.{i}.attn_norm.weight", ("blocks", "{i}", "attn_norm", "scale"), "copy"),
    ("model.layers.{i}.attn.q_proj.weight", ("blocks", "{i}", "attn", "q_proj", "kernel"),
     "linear"),
    ("model.layers.{i}.attn.k_proj.weight", ("blocks", "{i}", "attn", "k_proj", "kernel"),
     "linear"),
    ("model.layers.{i}.attn.v_proj.weight", ("blocks", "{i}", "attn", "v_proj", "kernel"),
     "linear"),
    ("model.layers.{i}.attn.a_proj.weight", ("blocks", "{i}", "attn", "a_proj", "kernel"),
     "linear"),
    ("model.layers.{i}.attn.b_proj.weight", ("blocks", "{i}", "attn", "b_proj", "kernel"),
     "linear"),
    ("model.layers.{i}.attn.lamb_proj.weight", ("blocks", "{i}", "attn", "lam_proj", "kernel"),
     "linear"),
    ("model.layers.{i}.attn.A_log", ("blocks", "{i}", "attn", "A_log"), "copy"),
    ("model.layers.{i}.attn.dt_bias", ("blocks", "{i}", "attn", "dt_bias"), "copy"),
    ("model.layers.{i}.attn.q_conv1d.weight", ("blocks", "{i}", "attn", "q_conv1d", "kernel"),
     "conv"),
    ("model.layers.{i}.attn.k_conv1d.weight", ("blocks", "{i}", "attn", "k_conv1d", "kernel"),
     "conv"),
    ("model.layers.{i}.attn.v_conv1d.weight", ("blocks", "{i}", "attn", "v_conv1d", "kernel"),
     "conv"),
    ("model.layers.{i}.attn.g_proj.weight", ("blocks", "{i}", "attn", "g_proj", "kernel"),
     "linear"),
    ("model.layers.{i}.attn.o_norm.weight", ("blocks", "{i}", "attn", "o_norm", "scale"), "copy"),
    ("model.layers.{i}.attn.o_proj.weight", ("blocks", "{i}", "attn", "o_proj", "kernel"),
     "linear"),
    ("model.layers.{i}.mlp_norm.weight", ("blocks", "{i}", "mlp_norm", "scale"), "copy"),
    ("model.layers.{i}.mlp.gate_proj.weight", ("blocks", "{i}", "mlp", "gate_proj", "kernel"),
     "linear"),
    ("model.layers.{i}.mlp.up_proj.weight", ("blocks", "{i}", "mlp", "up_proj", "kernel"),
     "linear"),
    ("model.layers.{i}.mlp.down_proj.weight", ("blocks", "{i}", "mlp", "down_proj", "kernel"),
     "linear"),
    ("model.norm.weight", ("norm", "scale"), "copy"),
    ("lm_head.weight", ("lm_head", "kernel"), "linear"),
)


def _to_ours(a: np.ndarray, layout: str) -> np.ndarray:
    if layout == "linear":
        return a.T
    if layout == "conv":
        return a[:, 0, :].T
    return a


def _to_hf(a: np.ndarray, layout: str) -> np.ndarray:
    if layout == "linear":
        a = a.T
    elif layout == "conv":
        a = a.T[:, None, :]
    return np.ascontiguousarray(a)


def _rows(num_layers: int):
    """The name map with ``{i}`` expanded: ``(hf_name, our_path, layout)`` for every layer."""
    for hf, ours, layout in NAME_MAP:
        if "{i}" not in hf:
            yield hf, ours, layout
            continue
        for i in range(num_layers):
            yield (hf.format(i=i), tuple(i if p == "{i}" else p for p in ours), layout)


# ----------------------------------------------------------------------------- config

# The authors' keys that set a field of QDeltaConfig (authors' name -> ours).
_MODEL_KEYS = {
    "vocab_size": "vocab_size", "hidden_size": "hidden_size",
    "num_hidden_layers": "num_hidden_layers", "num_heads": "num_heads", "head_dim": "head_dim",
    "expand_v": "expand_v", "num_v_heads": "num_v_heads", "hidden_ratio": "hidden_ratio",
    "intermediate_size": "intermediate_size", "conv_size": "conv_size",
    "use_short_conv": "use_short_conv", "use_gate": "use_gate",
    "allow_neg_eigval": "allow_neg_eigval", "lamb_bias": "lam_bias", "norm_eps": "norm_eps",
    "initializer_range": "initializer_range", "tie_word_embeddings": "tie_word_embeddings",
}

# The authors' keys that do not change the function of the weights, with the values their
# config class defaults to (what to_hf writes when it has no other value). Checked where a value
# would mean a model this code does not implement (see config_from_hf).
AUTHORS_METADATA: dict[str, Any] = {
    "attn": None,  # hybrid attention layers: must be null
    "attn_mode": "chunk",  # their kernel choice; this code always computes the recurrence
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": None,
    "fuse_cross_entropy": True,  # their fused kernels: the same function
    "fuse_linear_cross_entropy": False,
    "fuse_norm": True,
    "fuse_swiglu": True,
    "hidden_act": "swish",
    "max_position_embeddings": 2048,  # no position embeddings: unused
    "model_type": "qdelta",
    "use_cache": True,
    "use_l2warp": False,  # their training loss only
}

# Keys that transformers itself may write into any config.json: metadata for that library
# (labels, tracing and output switches, provenance), no effect on the weights' function.
_TRANSFORMERS_METADATA = frozenset({
    "transformers_version", "architectures", "auto_map", "torch_dtype", "dtype",
    "_name_or_path", "output_attentions", "output_hidden_states", "return_dict", "torchscript",
    "use_bfloat16", "tf_legacy_loss", "chunk_size_feed_forward", "id2label", "label2id",
    "problem_type", "tokenizer_class", "prefix", "sep_token_id", "decoder_start_token_id",
    "task_specific_params", "finetuning_task", "is_decoder", "is_encoder_decoder",
    "add_cross_attention", "tie_encoder_decoder", "cross_attention_hidden_size", "pruned_heads",
})


def _refuse(key: str, value: Any, why: str) -> None:
    raise ValueError(f"config key {key!r} = {value!r}: {why}")


def config_from_hf(d: dict[str, Any]) -> tuple[QDeltaConfig, dict[str, Any]]:
    """The authors' config dict as ``(QDeltaConfig, metadata)``.

    ``metadata`` holds the keys that do not change the model's function (token ids,
    ``max_position_embeddings``, fusion switches, ``transformers_version``, ...) with their
    values, for :func:`to_hf`'s ``extra_config``.

    Raises:
      ValueError: naming the key, for a key this model does not know, ``model_type`` other than
        ``"qdelta"``, hybrid attention layers (``attn`` set), an activation other than SiLU,
        an ``attn_mode`` the authors' code does not have, non-empty ``pruned_heads``,
        ``num_attention_heads`` other than ``num_heads``, or a bad value of a model key.
    """
    if not isinstance(d, dict):
        raise ValueError(f"an HF config must be a JSON object, got {type(d).__name__}")
    fields: dict[str, Any] = {}
    meta: dict[str, Any] = {}
    for key, value in d.items():
        if key in _MODEL_KEYS:
            fields[key] = value
        elif key in AUTHORS_METADATA or key in _TRANSFORMERS_METADATA:
            meta[key] = value
        elif key == "num_attention_heads":
            if value != d.get("num_heads"):
                _refuse(key, value, f"must equal num_heads ({d.get('num_heads')!r})")
            meta[key] = value
        else:
            _refuse(key, value, "not a key of the authors' Q-Delta config; this model does not "
                    "know what it means (remove it if it does not change the model)")
    if meta.get("model_type", "qdelta") != "qdelta":
        _refuse("model_type", meta["model_type"], "expected 'qdelta' (the authors' Q-Delta)")
    if meta.get("attn") is not None:
        _refuse("attn", meta["attn"], "hybrid attention layers are not supported")
    if meta.get("hidden_act", "swish") not in ("swish", "silu"):
        _refuse("hidden_act", meta["hidden_act"], "only 'swish' (SiLU) is supported")
    if meta.get("attn_mode", "chunk") not in ("chunk", "fused_recurrent"):
        _refuse("attn_mode", meta["attn_mode"], "the authors' modes are 'chunk' and "
                "'fused_recurrent' (either way this code computes the recurrence)")
    if meta.get("pruned_heads"):
        _refuse("pruned_heads", meta["pruned_heads"], "pruned heads are not supported")
    for key in ("use_l2warp", "fuse_cross_entropy", "fuse_linear_cross_entropy", "fuse_norm",
                "fuse_swiglu", "use_cache"):
        if key in meta and not isinstance(meta[key], bool):
            _refuse(key, meta[key], "expected true or false")
    if meta.get("use_l2warp"):
        warnings.warn("config key 'use_l2warp' = true: the authors' training loss adds an L2 "
                      "term on the logits; qdelta-train does not (the weights load the same)",
                      stacklevel=2)
    missing = sorted(k for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_heads",
                                 "head_dim") if k not in fields)
    if missing:
        raise ValueError(f"the HF config lacks the keys {missing}; the model's sizes cannot be "
                         "guessed")
    # The authors' hidden_ratio=None means their MLP's default, 4.
    if fields.get("hidden_ratio", 4) is None:
        fields["hidden_ratio"] = 4
    ours = {_MODEL_KEYS[k]: v for k, v in fields.items()}
    for key in ("expand_v", "hidden_ratio", "lam_bias", "norm_eps", "initializer_range"):
        v = ours.get(key)
        if isinstance(v, int) and not isinstance(v, bool):
            ours[key] = float(v)
    try:
        config = QDeltaConfig(**ours)
    except ValueError as e:
        # Name the authors' key (lamb_bias), not our field (lam_bias).
        raise ValueError(str(e).replace("QDeltaConfig.lam_bias", "config key 'lamb_bias'")
                         .replace("QDeltaConfig.", "config key ")) from None
    return config, meta


def config_to_hf(config: QDeltaConfig, extra_config: dict[str, Any] | None = None
                 ) -> dict[str, Any]:
    """The authors' config dict for ``config``: every key their config class writes (metadata
    keys from ``extra_config``, else the authors' defaults), keys sorted as
    ``save_pretrained`` writes them.

    Raises ValueError for what the authors' model cannot express: ``fixed_lam`` (it always
    learns lam), ``use_decay=False`` (it always has the decay gate), and for ``extra_config``
    keys that are model keys or unknown (those go through ``config``).
    """
    if config.fixed_lam is not None:
        raise ValueError(f"QDeltaConfig.fixed_lam = {config.fixed_lam}: the authors' model always "
                         "learns lam (lamb_proj); it cannot hold a fixed-lam model")
    if not config.use_decay:
        raise ValueError("QDeltaConfig.use_decay = False: the authors' model always has the "
                         "decay gate (a_proj, A_log, dt_bias); it cannot hold this model")
    extra = dict(extra_config or {})
    bad = sorted(k for k in extra if k in _MODEL_KEYS)
    if bad:
        raise ValueError(f"extra_config holds model keys {bad}; those come from the model's "
                         "config")
    unknown = sorted(k for k in extra if k not in AUTHORS_METADATA
                     and k not in _TRANSFORMERS_METADATA and k != "num_attention_heads")
    if unknown:
        raise ValueError(f"extra_config holds keys {unknown} that are not HF metadata keys of "
                         "the authors' config")

    def num(x: float):
        return int(x) if float(x).is_integer() else float(x)

    out: dict[str, Any] = dict(AUTHORS_METADATA)
    out.update(extra)
    for theirs, ours in _MODEL_KEYS.items():
        v = getattr(config, ours)
        if theirs in ("expand_v", "hidden_ratio"):
            v = num(v)
        out[theirs] = v
    return dict(sorted(out.items()))


def read_hf_config(path: str | os.PathLike) -> tuple[QDeltaConfig, dict[str, Any]]:
    """``config_from_hf`` of ``path/config.json`` (``path`` a model folder, or the file)."""
    p = Path(path)
    f = p / CONFIG_FILE if p.is_dir() else p
    if not f.is_file():
        raise FileNotFoundError(f"{f}: no such file (an HF model folder holds {CONFIG_FILE})")
    text = f.read_text()
    try:
        d = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{f} is not valid JSON ({e})") from None
    try:
        return config_from_hf(d)
    except ValueError as e:
        raise ValueError(f"{f}: {e}") from None


# ----------------------------------------------------------------------------- tensors


def _safetensors():
    try:
        from safetensors import numpy as st
    except ImportError:
        raise ImportError("reading and writing HF checkpoints needs the safetensors package: "
                          'pip install "qdelta-jax[hf]" (or pip install safetensors)') from None
    return st


def read_hf_tensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every tensor of an HF model folder: ``model.safetensors``, or the shards listed in
    ``model.safetensors.index.json``. Raises FileNotFoundError naming what is missing and
    ValueError for an index that does not match its shards."""
    st = _safetensors()
    p = Path(path)
    index = p / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ValueError(f"{index}: expected a JSON object with a 'weight_map' of tensor "
                             "names to shard files") from None
        out: dict[str, np.ndarray] = {}
        for shard in sorted(set(weight_map.values())):
            f = p / shard
            if not f.is_file():
                raise FileNotFoundError(f"{f}: a shard listed in {index} is missing")
            tensors = st.load_file(str(f))
            listed = {k for k, v in weight_map.items() if v == shard}
            if set(tensors) != listed:
                raise ValueError(f"{f} holds other tensors than {index} lists for it (missing "
                                 f"{sorted(listed - set(tensors))[:5]}, unlisted "
                                 f"{sorted(set(tensors) - listed)[:5]})")
            out.update(tensors)
        return out
    f = p / WEIGHTS_FILE
    if f.is_file():
        return st.load_file(str(f))
    torch_only = [n for n in ("pytorch_model.bin", "pytorch_model.bin.index.json")
                  if (p / n).exists()]
    hint = (f"; {torch_only[0]} is PyTorch's pickle format: save the model with "
            "save_pretrained(..., safe_serialization=True) first") if torch_only else ""
    raise FileNotFoundError(f"{p}: no {WEIGHTS_FILE} or {INDEX_FILE}{hint}")


def _dtype_name(value, name: str) -> str | None:
    if value is None:
        return None
    try:
        d = jnp.dtype(value).name
    except TypeError:
        d = str(value)
    if d not in DTYPES:
        raise ValueError(f"{name} must be None or one of {DTYPES}, got {value!r}")
    return d


def _stored_dtype(tensors: dict[str, np.ndarray]) -> str:
    """The parameter dtype that holds the stored tensors exactly: their common dtype when it is
    float32 or bfloat16, else float32 (float16 or mixed dtypes widen to float32 exactly)."""
    kinds = {np.dtype(a.dtype).name for a in tensors.values()}
    return kinds.pop() if len(kinds) == 1 and next(iter(kinds)) in DTYPES else "float32"


def _check_path(path) -> Path:
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"{p}: no such folder (expected an HF model folder with "
                                f"{CONFIG_FILE} and {WEIGHTS_FILE})")
    return p


def from_hf(path: str | os.PathLike, *, dtype=None, param_dtype=None) -> QDeltaLM:
    """Loads the authors' HF model folder as a :class:`qdelta_jax.model.QDeltaLM`.

    Args:
      path: a folder with ``config.json`` and ``model.safetensors`` (or sharded safetensors
        with ``model.safetensors.index.json``).
      dtype: compute dtype, ``"float32"`` or ``"bfloat16"`` (``None``: float32).
      param_dtype: parameter dtype (``None``: the stored dtype when it is float32 or bfloat16,
        else float32, which holds float16 exactly).

    Returns:
      the model, computing the Q-Delta recurrence of these weights (not the authors' chunked
      kernel's approximation of it; see the module docstring).

    Raises:
      ImportError: without the ``safetensors`` package.
      FileNotFoundError: for a missing folder, config or weights file (or shard).
      ValueError: for config keys this model cannot honour (named), and for tensors that are
        missing, unexpected or of the wrong shape (named, with the shape expected).
    """
    p = _check_path(path)
    config, _ = read_hf_config(p)
    tensors = read_hf_tensors(p)
    compute = _dtype_name(dtype, "dtype") or "float32"
    pdtype = _dtype_name(param_dtype, "param_dtype") or _stored_dtype(tensors)
    config = dataclasses.replace(config, compute_dtype=compute, param_dtype=pdtype)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: QDeltaLM(config, rngs=nnx.Rngs(0))))
    flat = dict(nnx.to_flat_state(state))
    used, missing, loaded = set(), [], []
    for hf_name, ours, layout in _rows(config.num_hidden_layers):
        if ours not in flat:
            continue
        if hf_name not in tensors:
            missing.append(hf_name)
            continue
        want = _hf_shape(flat[ours].shape, layout)
        if tuple(tensors[hf_name].shape) != want:
            raise ValueError(f"{p}: tensor {hf_name} has shape {list(tensors[hf_name].shape)}, "
                             f"expected {list(want)} for this config")
        a = _to_ours(tensors[hf_name], layout)
        used.add(hf_name)
        loaded.append((ours, flat[ours].replace(jnp.asarray(a, dtype=pdtype))))
    if missing:
        raise ValueError(f"{p}: the weights lack {len(missing)} tensors this config needs: "
                         f"{missing[:6]}{' ...' if len(missing) > 6 else ''}")
    extra = sorted(set(tensors) - used)
    if config.tie_word_embeddings and "lm_head.weight" in extra:
        # Tied weights saved with the duplicate: it must be the embedding.
        if not np.array_equal(tensors["lm_head.weight"], tensors["model.embeddings.weight"]):
            raise ValueError(f"{p}: tie_word_embeddings is true but lm_head.weight differs from "
                             "model.embeddings.weight")
        extra.remove("lm_head.weight")
    if extra:
        raise ValueError(f"{p}: the weights hold {len(extra)} tensors this config does not "
                         f"use: {extra[:6]}{' ...' if len(extra) > 6 else ''} (check the config: "
                         "use_gate, use_short_conv, tie_word_embeddings, num_hidden_layers)")
    return nnx.merge(graphdef, nnx.from_flat_state(loaded))


def _hf_shape(shape: tuple[int, ...], layout: str) -> tuple[int, ...]:
    if layout == "linear":
        return tuple(reversed(shape))
    if layout == "conv":
        return (shape[1], 1, shape[0])
    return tuple(shape)


def hf_tensors(model: QDeltaLM) -> dict[str, np.ndarray]:
    """The model's parameters as the authors' named tensors (NumPy, the parameters' dtype),
    in :data:`NAME_MAP` order. Works for ``scan_layers`` models too (the stacked layer axis is
    split)."""
    config = model.config
    config_to_hf(config)  # refuses what the authors' model cannot hold
    flat = {path: var[...] for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    out: dict[str, np.ndarray] = {}
    for hf_name, ours, layout in _rows(config.num_hidden_layers):
        if config.scan_layers and ours[0] == "blocks":
            key, index = ("blocks",) + ours[2:], ours[1]
        else:
            key, index = ours, None
        if key not in flat:
            continue
        value = flat[key] if index is None else flat[key][index]
        out[hf_name] = _to_hf(np.asarray(jax.device_get(value)), layout)
    return out


def to_hf(model: QDeltaLM, path: str | os.PathLike, *,
          extra_config: dict[str, Any] | None = None, max_shard_size: int = MAX_SHARD_SIZE,
          overwrite: bool = False) -> Path:
    """Writes ``model`` as an HF model folder the authors' ``QDeltaForCausalLM`` loads:
    ``config.json`` and ``model.safetensors`` (or shards of at most ``max_shard_size`` bytes
    with ``model.safetensors.index.json``), the authors' tensor names and layouts, in the
    parameters' dtype. Tied embeddings are written once, as transformers does.

    Args:
      extra_config: metadata keys for ``config.json`` (token ids, ``transformers_version``,
        ...), as the second value of :func:`read_hf_config` returns them; the authors'
        defaults otherwise.
      max_shard_size: bytes per safetensors file (a larger tensor gets a file of its own).
      overwrite: replace an existing model in ``path``; without it a folder that already holds
        a ``config.json`` or safetensors file is refused (nothing there is touched).

    Returns the folder. Raises ValueError for a model the authors' code cannot express
    (``fixed_lam``, ``use_decay=False``), bad ``extra_config`` keys or ``max_shard_size``, and
    FileExistsError for an existing model without ``overwrite``.
    """
    st = _safetensors()
    if not isinstance(model, QDeltaLM):
        raise TypeError(f"model must be a QDeltaLM, got {type(model).__name__}")
    if (not isinstance(max_shard_size, (int, np.integer)) or isinstance(max_shard_size, bool)
            or max_shard_size < 1):
        raise ValueError(f"max_shard_size must be a positive number of bytes, got "
                         f"{max_shard_size!r}")
    config = config_to_hf(model.config, extra_config)
    tensors = hf_tensors(model)
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise FileExistsError(f"{p} exists and is not a folder")
    old = sorted(x.name for x in p.glob("*")
                 if x.name in (CONFIG_FILE, INDEX_FILE) or x.suffix == ".safetensors"
                 ) if p.is_dir() else []
    if old and not overwrite:
        raise FileExistsError(f"{p} already holds a model ({', '.join(old[:4])}); pass "
                              "overwrite=True (--overwrite) or choose another folder")
    p.mkdir(parents=True, exist_ok=True)

    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, a in tensors.items():
        if shards[-1] and size + a.nbytes > max_shard_size:
            shards.append({})
            size = 0
        shards[-1][name] = a
        size += a.nbytes
    n = len(shards)
    names = [WEIGHTS_FILE] if n == 1 else [f"model-{k + 1:05d}-of-{n:05d}.safetensors"
                                           for k in range(n)]
    written = []
    for name, shard in zip(names, shards, strict=True):
        _write_atomic(p / name, lambda f, s=shard: st.save_file(s, f, metadata={"format": "pt"}))
        written.append(name)
    if n > 1:
        index = {"metadata": {"total_size": int(sum(a.nbytes for a in tensors.values()))},
                 "weight_map": {k: names[i] for i, s in enumerate(shards) for k in s}}
        _write_atomic(p / INDEX_FILE, lambda f: Path(f).write_text(
            json.dumps(index, indent=2, sort_keys=True) + "\n"))
        written.append(INDEX_FILE)
    _write_atomic(p / CONFIG_FILE, lambda f: Path(f).write_text(
        json.dumps(config, indent=2, sort_keys=True) + "\n"))
    # A previous model's files that this one does not use (other shard counts) would confuse a
    # reader of the folder; they were replaced on request (overwrite=True).
    for name in old:
        if name not in written and name != CONFIG_FILE:
            (p / name).unlink()
    return p


def _write_atomic(target: Path, write) -> None:
    tmp = target.with_name(target.name + ".tmp")
    write(str(tmp))
    os.replace(tmp, target)

