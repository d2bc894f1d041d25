"""The Q-Delta language model's configuration: :class:`QDeltaConfig`, the named presets, the
closed-form parameter count and the weight-decay rule.

Weight decay: :func:`weight_decay_mask` gives True for the parameters that get weight decay
(matrices, conv taps, the embedding) and False for ``A_log``, ``dt_bias``, every norm weight
(``scale``) and biases: pass it as optax's ``mask=``. It keys on the parameter names of
:mod:`qdelta_jax.layers` and :mod:`qdelta_jax.lm`, so it needs no model.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import warnings
from typing import Any

import jax
import numpy as np

from qdelta_jax import ops

DTYPES = ("float32", "bfloat16")



def derived_intermediate_size(hidden_size: int, hidden_ratio: float) -> int:
    """``int(hidden_ratio * D * 2 / 3)`` rounded up to a multiple of 256 (as fla does)."""
    size = int(hidden_size * hidden_ratio * 2 / 3)
    return 256 * ((size + 255) // 256)


@dataclasses.dataclass(frozen=True)
class QDeltaConfig:
    """Everything that defines a Q-Delta LM. Values are checked on construction.

    ``intermediate_size=None`` derives it from ``hidden_ratio`` (see
    :func:`derived_intermediate_size`); ``num_v_heads=None`` means ``num_heads``.
    ``compute_dtype`` / ``param_dtype``: ``"float32"`` or ``"bfloat16"``.
    ``scan_layers=True`` stores the blocks' parameters stacked on a leading ``[num_hidden_layers]``
    axis and runs them with ``lax.scan`` (one compiled block instead of an unrolled loop: much
    faster compilation for deep models); see :class:`QDeltaLM`. ``save_residuals``: the Pallas
    kernels' (see :class:`qdelta_jax.layers.QDelta`); it changes memory and speed, not results.
    ``guard_nonfinite``: the op's (:func:`qdelta_jax.qdelta_rule`): a NaN or inf in a layer's
    inputs spoils exactly what the recurrence spoils, at a cost (off by default).
    """

    vocab_size: int = 32000
    hidden_size: int = 1024
    num_hidden_layers: int = 21
    num_heads: int = 6
    head_dim: int = 128
    expand_v: float = 2.0
    num_v_heads: int | None = None
    hidden_ratio: float = 4.0
    intermediate_size: int | None = None
    conv_size: int = 4
    use_short_conv: bool = True
    use_gate: bool = True
    allow_neg_eigval: bool = False
    lam_bias: float = 0.9
    fixed_lam: float | None = None
    use_decay: bool = True
    norm_eps: float = 1e-6
    initializer_range: float = 0.02
    tie_word_embeddings: bool = False
    chunk_size: int = 64
    implementation: str | None = None
    save_residuals: bool | None = None
    guard_nonfinite: bool = False
    remat: bool = False
    scan_layers: bool = False
    compute_dtype: str = "float32"
    param_dtype: str = "float32"

    def __post_init__(self):
        def bad(name, want):
            raise ValueError(f"QDeltaConfig.{name} must be {want}, got {getattr(self, name)!r}")

        def is_int(x):
            return isinstance(x, (int, np.integer)) and not isinstance(x, bool)

        def is_num(x):
            return (isinstance(x, (int, float, np.integer, np.floating))
                    and not isinstance(x, bool) and math.isfinite(float(x)))

        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_heads", "head_dim",
                     "conv_size"):
            if not is_int(getattr(self, name)) or getattr(self, name) < 1:
                bad(name, "a positive integer")
        for name in ("use_short_conv", "use_gate", "allow_neg_eigval", "use_decay",
                     "tie_word_embeddings", "remat", "scan_layers"):
            if not isinstance(getattr(self, name), bool):
                bad(name, "a bool")
        if not is_num(self.expand_v) or self.expand_v <= 0:
            bad("expand_v", "a positive number")
        if float(self.expand_v * self.head_dim) != int(self.expand_v * self.head_dim):
            bad("expand_v", f"such that expand_v * head_dim ({self.head_dim}) is an integer")
        if self.num_v_heads is not None and (
            not is_int(self.num_v_heads) or self.num_v_heads < 1
            or self.num_v_heads % self.num_heads
        ):
            bad("num_v_heads", f"None or a positive multiple of num_heads ({self.num_heads})")
        if not is_num(self.hidden_ratio) or self.hidden_ratio <= 0:
            bad("hidden_ratio", "a positive number")
        if self.intermediate_size is not None and (
            not is_int(self.intermediate_size) or self.intermediate_size < 1
        ):
            bad("intermediate_size", "None or a positive integer")
        if not is_num(self.lam_bias):
            bad("lam_bias", "a finite number")
        if self.fixed_lam is not None and not is_num(self.fixed_lam):
            bad("fixed_lam", "None (learned lam) or a finite number")
        for name in ("norm_eps", "initializer_range"):
            if not is_num(getattr(self, name)) or getattr(self, name) <= 0:
                bad(name, "a positive number")
        c = self.chunk_size
        if not is_int(c) or c < 1 or c & (c - 1):
            bad("chunk_size", "a power of two (16, 32, 64, 128)")
        if self.implementation is not None and self.implementation not in ops.IMPLEMENTATIONS:
            bad("implementation", f"None or one of {ops.IMPLEMENTATIONS}")
        if not (self.save_residuals is None or isinstance(self.save_residuals, bool)):
            bad("save_residuals", "None (the kernels' default), True or False")
        if not isinstance(self.guard_nonfinite, bool):
            bad("guard_nonfinite", "True or False")
        for name in ("compute_dtype", "param_dtype"):
            if getattr(self, name) not in DTYPES:
                bad(name, f"one of {DTYPES}")

    # ---- derived sizes

    @property
    def v_heads(self) -> int:
        return self.num_heads if self.num_v_heads is None else self.num_v_heads

    @property
    def head_v_dim(self) -> int:
        return int(self.expand_v * self.head_dim)

    @property
    def mlp_size(self) -> int:
        if self.intermediate_size is not None:
            return self.intermediate_size
        return derived_intermediate_size(self.hidden_size, self.hidden_ratio)

    # ---- presets and serialisation

    @classmethod
    def from_preset(cls, name: str, **overrides) -> QDeltaConfig:
        """A named preset (``"tiny"``, ``"340m"``, ``"1b"``) with field overrides."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; presets: {sorted(PRESETS)}")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - fields)
        if unknown:
            raise ValueError(f"unknown QDeltaConfig fields {unknown}")
        return cls(**{**PRESETS[name], **overrides})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self, path: str | os.PathLike | None = None) -> str:
        """The config as JSON text; also written to ``path`` when given."""
        text = json.dumps(self.to_dict(), indent=2, sort_keys=True)
        if path is not None:
            with open(path, "w") as f:
                f.write(text + "\n")
        return text

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QDeltaConfig:
        """From our own keys or the authors' HF config keys (``lamb_bias`` -> ``lam_bias``).

        HF keys with no meaning here (``model_type``, ``fuse_*``, token ids, ...) are ignored;
        other unknown keys are ignored with a warning. Hybrid attention layers (``attn`` set)
        and activations other than SiLU raise ``ValueError``. :func:`qdelta_jax.hf.from_hf`
        reads an HF folder strictly instead (every key used, kept as metadata, or refused).
        """
        d = dict(d)
        fields = {f.name for f in dataclasses.fields(cls)}
        out: dict[str, Any] = {}
        if "lamb_bias" in d:
            v = d.pop("lamb_bias")
            if "lam_bias" not in d:
                d["lam_bias"] = v
        if d.get("attn") is not None:
            raise ValueError(
                f"config key 'attn' = {d['attn']!r}: hybrid attention layers are not supported"
            )
        act = d.get("hidden_act", "swish")
        if act not in ("swish", "silu"):
            raise ValueError(f"config key 'hidden_act' must be 'swish' or 'silu', got {act!r}")
        if d.get("attn_mode", "chunk") not in ("chunk", "fused_recurrent", "fused_chunk"):
            raise ValueError(f"config key 'attn_mode' has unknown value {d['attn_mode']!r}")
        for key, value in d.items():
            if key in fields:
                if key == "hidden_ratio" and value is None:
                    continue  # HF writes null for the default
                out[key] = value
            elif key not in _HF_IGNORED:
                warnings.warn(f"QDeltaConfig: ignoring unknown config key {key!r}", stacklevel=2)
        for key in ("expand_v", "hidden_ratio", "lam_bias", "norm_eps", "initializer_range"):
            if isinstance(out.get(key), int) and not isinstance(out.get(key), bool):
                out[key] = float(out[key])
        return cls(**out)

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> QDeltaConfig:
        """Reads a JSON file written by :meth:`to_json` or an authors' HF ``config.json``."""
        with open(path) as f:
            text = f.read()
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            what = "is empty" if not text.strip() else f"is not valid JSON ({e})"
            raise ValueError(f"{path} {what}; expected a model config object") from None
        if not isinstance(d, dict):
            raise ValueError(f"{path}: expected a JSON object, got {type(d).__name__}")
        return cls.from_dict(d)


# HF config keys that carry no information for this model.
_HF_IGNORED = frozenset({
    "attn", "attn_mode", "hidden_act", "model_type", "architectures", "transformers_version",
    "torch_dtype", "dtype", "use_cache", "pad_token_id", "bos_token_id", "eos_token_id",
    "max_position_embeddings", "fuse_norm", "fuse_swiglu", "fuse_cross_entropy",
    "fuse_linear_cross_entropy", "use_l2warp", "auto_map", "_name_or_path", "num_attention_heads",
})

PRESETS: dict[str, dict[str, Any]] = {
    # Small enough for CPU tests; chunk 16 so short test sequences span several chunks.
    "tiny": dict(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_heads=2, head_dim=32,
                 chunk_size=16),
    "340m": dict(vocab_size=32000, hidden_size=1024, num_hidden_layers=21, num_heads=6,
                 head_dim=128),
    "1b": dict(vocab_size=32000, hidden_size=2048, num_hidden_layers=21, num_heads=6,
               head_dim=256),
}


def count_params(config: QDeltaConfig) -> int:
    """The number of parameters, in closed form (no model is built)."""
    c = config
    D, H, HV, K, V, W = (c.hidden_size, c.num_heads, c.v_heads, c.head_dim, c.head_v_dim,
                         c.conv_size)
    attn = D * H * K * 2 + D * HV * V  # q, k, v projections
    attn += D * HV  # b_proj
    attn += D * HV if c.fixed_lam is None else 0  # lam_proj
    attn += D * HV + 2 * HV if c.use_decay else 0  # a_proj, A_log, dt_bias
    attn += W * (2 * H * K + HV * V) if c.use_short_conv else 0  # depthwise conv kernels
    attn += D * HV * V if c.use_gate else 0  # g_proj
    attn += V + HV * V * D  # o_norm, o_proj
    mlp = 3 * D * c.mlp_size
    block = attn + mlp + 2 * D  # two pre-norms
    embed = c.vocab_size * D * (1 if c.tie_word_embeddings else 2)
    return c.num_hidden_layers * block + embed + D


# ----------------------------------------------------------------------------- weight decay

NO_DECAY_NAMES = frozenset({"A_log", "dt_bias", "scale", "bias"})


def _key_name(entry) -> str | None:
    for attr in ("key", "name"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return None


def weight_decay_mask(params) -> Any:
    """A pytree of bools shaped like ``params``: True where weight decay applies.

    The one weight-decay rule of the project (the trainer's default): decay every parameter
    with at least 2 dimensions (matrices, conv taps, the embedding) except ``A_log`` and
    ``dt_bias`` (docs/MATH.md section 4); never norm weights (named ``scale``), biases or other
    vectors. Works on ``nnx.state(model, nnx.Param)``, on plain nested dicts (Linen
    ``params``) and on ``jax.ShapeDtypeStruct`` leaves. Use as
    ``optax.adamw(..., mask=weight_decay_mask)``.
    """

    def leaf(path, x):
        names = {_key_name(e) for e in path}
        return not (names & NO_DECAY_NAMES) and len(getattr(x, "shape", ())) >= 2

    return jax.tree_util.tree_map_with_path(leaf, params)
