"""The Q-Delta language model: config and presets, the NNX model, decoding and generation.

Model (SPEC section 4): token embedding, ``num_hidden_layers`` pre-norm blocks
``x + QDelta(RMSNorm(x))`` then ``x + SwiGLU(RMSNorm(x))``, a final RMSNorm and an untied
``lm_head`` (tied with ``tie_word_embeddings``). Logits are float32. With
``compute_dtype="bfloat16"`` activations and matmul inputs are bfloat16 while parameters stay in
``param_dtype`` (float32); the recurrent state, gates and norms are float32 throughout.

Decoding computes the same function as training:

* ``cache = model.init_cache(B)``; ``logits, cache = model.step(tokens [B, L], cache)``.
  L > 1 (prefill) runs the chunked op with the cached state as ``initial_state``; L == 1 runs
  :func:`qdelta_jax.reference.qdelta_step`, the single copy of the update. Both carry the short
  conv caches. Prefill then steps reproduce the full forward's logits at every position.
* :func:`generate` is one jitted program (``lax.scan`` over new tokens). Prompts of different
  lengths: ``prompt[b, :prompt_lengths[b]]`` is row b's prompt (right padding, the natural
  layout); rows are moved to left padding internally and the pad positions are masked (zero
  conv input, ``beta = g = 0``), so the state after the prompt is what the unpadded prompt
  leaves and every row generates what it would generate alone.

Weight decay: :func:`weight_decay_mask` (alias :func:`no_decay_mask`) gives True for parameters
that get weight decay and False for ``A_log``, ``dt_bias``, every norm weight (``scale``) and
biases (there are none by default): pass it as optax's ``mask=``.

Diagnostics: ``model(tokens, return_aux=True)`` returns ``(logits, aux)`` with ``aux`` a tuple
over layers of ``dict(q, k, beta, lam, g)``: L2-normalised ``q, k [B, T, HV, K]`` (after the
grouped-head repeat, as the op sees them) and ``beta, lam, g [B, T, HV]`` float32, so that
``beta * (k . (k + lam q))`` is the stability quantity of SPEC section 1.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import warnings
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Bool, Float, Int

from qdelta_jax import ops
from qdelta_jax.layers import LayerCache, QDelta, RMSNorm, normalize_cu_seqlens

F32 = jnp.float32
DTYPES = ("float32", "bfloat16")

# ----------------------------------------------------------------------------- config


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
    faster compilation for deep models); see :class:`QDeltaLM`.
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
        and activations other than SiLU raise ``ValueError``.
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

    False for ``A_log``, ``dt_bias`` (SPEC section 4), every norm weight (named ``scale``) and
    every bias. Works on ``nnx.state(model, nnx.Param)`` and on plain nested dicts (Linen
    ``params``). Use as ``optax.adamw(..., mask=weight_decay_mask)``.
    """

    def leaf(path, _):
        names = {_key_name(e) for e in path}
        return not (names & NO_DECAY_NAMES)

    return jax.tree_util.tree_map_with_path(leaf, params)


no_decay_mask = weight_decay_mask  # the name the training code may know it by; same semantics


# ----------------------------------------------------------------------------- model


class SwiGLU(nnx.Module):
    """``down(SiLU(gate(x)) * up(x))``."""

    def __init__(self, hidden_size: int, intermediate_size: int, *, std: float, dtype,
                 param_dtype, rngs: nnx.Rngs):
        def linear(n_in, n_out):
            return nnx.Linear(n_in, n_out, use_bias=False, dtype=dtype, param_dtype=param_dtype,
                              kernel_init=nnx.initializers.normal(std), rngs=rngs)

        self.gate_proj = linear(hidden_size, intermediate_size)
        self.up_proj = linear(hidden_size, intermediate_size)
        self.down_proj = linear(intermediate_size, hidden_size)

    def __call__(self, x: Array) -> Array:
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nnx.Module):
    """``x + QDelta(RMSNorm(x))``, then ``x + SwiGLU(RMSNorm(x))``."""

    def __init__(self, config: QDeltaConfig, *, rngs: nnx.Rngs):
        c = config
        dtype, pdtype = jnp.dtype(c.compute_dtype), jnp.dtype(c.param_dtype)
        self.attn_norm = RMSNorm(c.hidden_size, eps=c.norm_eps, param_dtype=pdtype)
        self.attn = QDelta(
            c.hidden_size, c.num_heads, c.head_dim, expand_v=c.expand_v,
            num_v_heads=c.num_v_heads, use_gate=c.use_gate, use_short_conv=c.use_short_conv,
            conv_size=c.conv_size, allow_neg_eigval=c.allow_neg_eigval, lam_bias=c.lam_bias,
            fixed_lam=c.fixed_lam, use_decay=c.use_decay, norm_eps=c.norm_eps,
            chunk_size=c.chunk_size, implementation=c.implementation,
            initializer_range=c.initializer_range, dtype=dtype, param_dtype=pdtype, rngs=rngs,
        )
        self.mlp_norm = RMSNorm(c.hidden_size, eps=c.norm_eps, param_dtype=pdtype)
        self.mlp = SwiGLU(c.hidden_size, c.mlp_size, std=c.initializer_range, dtype=dtype,
                          param_dtype=pdtype, rngs=rngs)

    def __call__(self, x, *, cu_seqlens=None, cache=None, mask=None, return_aux=False):
        out = self.attn(self.attn_norm(x), cu_seqlens=cu_seqlens, cache=cache, mask=mask,
                        return_aux=return_aux)
        out = out if isinstance(out, tuple) else (out,)
        x = x + out[0]
        x = x + self.mlp(self.mlp_norm(x))
        return (x,) + out[1:] if len(out) > 1 else x


def _block_forward(block: Block, x, cu_seqlens, return_aux: bool):
    return block(x, cu_seqlens=cu_seqlens, return_aux=return_aux)


ModelCache = tuple  # tuple[LayerCache, ...], one per layer


class QDeltaLM(nnx.Module):
    """The Q-Delta language model. ``QDeltaLM(config, rngs=nnx.Rngs(seed))``.

    Parameters: ``embed.embedding [vocab, D]``, ``blocks[i].{attn_norm, attn, mlp_norm, mlp}``,
    ``norm``, ``lm_head.kernel [D, vocab]`` (absent when tied).

    With ``config.scan_layers``: ``blocks`` is one :class:`Block` whose parameters carry a
    leading ``[num_hidden_layers]`` axis (``blocks.attn.q_proj.kernel [L, D, H*K]``; created
    with ``nnx.vmap``, so the per-layer initial values differ from the unrolled model's for the
    same seed, though they have the same distribution). The forward pass is a ``lax.scan`` over
    layers (``remat`` checkpoints the scanned body), decoding too, and the decoding cache is
    one :class:`qdelta_jax.layers.LayerCache` whose arrays have a leading ``[L]`` axis instead of
    a tuple of per-layer caches. :func:`to_scanned` converts an unrolled model to that layout
    (same parameters).
    """

    def __init__(self, config: QDeltaConfig, *, rngs: nnx.Rngs):
        self.config = config
        c = config
        dtype, pdtype = jnp.dtype(c.compute_dtype), jnp.dtype(c.param_dtype)
        self.dtype = dtype
        self.embed = nnx.Embed(c.vocab_size, c.hidden_size, dtype=dtype, param_dtype=pdtype,
                               embedding_init=nnx.initializers.normal(c.initializer_range),
                               rngs=rngs)
        if c.scan_layers:
            @nnx.split_rngs(splits=c.num_hidden_layers)
            @nnx.vmap(in_axes=0, out_axes=0)
            def stacked_blocks(rngs):
                return Block(c, rngs=rngs)

            self.blocks = stacked_blocks(rngs)
        else:
            self.blocks = nnx.List([Block(c, rngs=rngs) for _ in range(c.num_hidden_layers)])
        self.norm = RMSNorm(c.hidden_size, eps=c.norm_eps, param_dtype=pdtype)
        if c.tie_word_embeddings:
            self.lm_head = None
        else:
            self.lm_head = nnx.Linear(
                c.hidden_size, c.vocab_size, use_bias=False, dtype=dtype, param_dtype=pdtype,
                kernel_init=nnx.initializers.normal(c.initializer_range),
                preferred_element_type=F32, rngs=rngs,
            )

    def _logits(self, x: Array) -> Float[Array, "B T vocab"]:
        x = self.norm(x)
        if self.lm_head is None:
            w = self.embed.embedding[...].astype(self.dtype)
            return jnp.einsum("btd,vd->btv", x.astype(self.dtype), w,
                              preferred_element_type=F32)
        return self.lm_head(x).astype(F32)

    def _check_tokens(self, tokens, name: str = "tokens"):
        if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(
                f"{name} must be an integer array [B, T], got {tokens.dtype} {list(tokens.shape)}"
            )
        check_token_ids(tokens, self.config.vocab_size, name)

    def __call__(
        self,
        tokens: Int[Array, "B T"],
        *,
        cu_seqlens: Int[Array, "B S+1"] | None = None,
        return_aux: bool = False,
    ):
        """Logits ``[B, T, vocab]`` float32 (``(logits, aux)`` with ``return_aux``).

        ``cu_seqlens``: packed documents, per-row offsets ``[B, S + 1]`` (or ``[S + 1]`` with
        B == 1); nothing crosses a boundary.
        """
        self._check_tokens(tokens)
        B, T = tokens.shape
        if cu_seqlens is not None:
            cu_seqlens = normalize_cu_seqlens(cu_seqlens, B, T)
        x = self.embed(tokens)
        if self.config.scan_layers:
            x, aux = self._scan_blocks(x, cu_seqlens, return_aux)
            logits = self._logits(x)
            return (logits, aux) if return_aux else logits
        fwd = nnx.remat(_block_forward, static_argnums=(3,)) if self.config.remat else (
            _block_forward)
        aux = []
        for block in self.blocks:
            out = fwd(block, x, cu_seqlens, return_aux)
            if return_aux:
                x, a = out
                aux.append(a)
            else:
                x = out
        logits = self._logits(x)
        return (logits, tuple(aux)) if return_aux else logits

    def _scan_blocks(self, x, cu_seqlens, return_aux: bool):
        """The stacked blocks as one ``lax.scan`` over layers; aux as a per-layer tuple."""
        graphdef, params = nnx.split(self.blocks)

        def body(x, p):
            out = nnx.merge(graphdef, p)(x, cu_seqlens=cu_seqlens, return_aux=return_aux)
            return out if return_aux else (out, None)

        if self.config.remat:
            body = jax.checkpoint(body, prevent_cse=False)
        x, aux = jax.lax.scan(body, x, params)
        if return_aux:
            aux = tuple(jax.tree.map(lambda a, i=i: a[i], aux)
                        for i in range(self.config.num_hidden_layers))
        return x, aux

    # ------------------------------------------------------------------ decoding

    def init_cache(self, batch_size: int) -> ModelCache | LayerCache:
        """Zero decoding cache: a tuple of :class:`qdelta_jax.layers.LayerCache`, one per layer
        (with ``scan_layers``: one ``LayerCache`` of arrays with a leading ``[L]`` axis)."""
        _check_batch_size(batch_size)
        if self.config.scan_layers:
            # QDelta.init_cache reads only static sizes, so the stacked module gives one layer's.
            L = self.config.num_hidden_layers
            return jax.tree.map(lambda a: jnp.zeros((L,) + a.shape, a.dtype),
                                self.blocks.attn.init_cache(batch_size))
        return tuple(block.attn.init_cache(batch_size) for block in self.blocks)

    def step(
        self,
        tokens: Int[Array, "B L"],
        cache: ModelCache,
        *,
        mask: Bool[Array, "B L"] | None = None,
    ) -> tuple[Float[Array, "B L vocab"], ModelCache]:
        """Continues decoding: logits for ``tokens`` given the cache, and the new cache.

        L > 1 runs the chunked op (prefill), L == 1 the one-token update. ``mask`` (False at
        left padding) keeps pad positions from touching the state and the conv caches.
        """
        self._check_tokens(tokens)
        _check_cache_batch(cache, tokens.shape[0], self.config.scan_layers)
        if self.config.scan_layers:
            return self._scan_step(tokens, cache, mask)
        if len(cache) != len(self.blocks):
            raise ValueError(f"cache has {len(cache)} layers, the model {len(self.blocks)}")
        x = self.embed(tokens)
        new = []
        for block, layer_cache in zip(self.blocks, cache, strict=True):
            x, c = block(x, cache=LayerCache(*layer_cache), mask=mask)
            new.append(c)
        return self._logits(x), tuple(new)

    def _scan_step(self, tokens, cache: LayerCache, mask):
        L = self.config.num_hidden_layers
        if not isinstance(cache, LayerCache) or cache.state.ndim != 5 or cache.state.shape[0] != L:
            raise ValueError(
                f"with scan_layers the cache is one LayerCache with a leading [{L}] axis (as "
                "init_cache returns)"
            )
        graphdef, params = nnx.split(self.blocks)

        def body(x, xs):
            p, layer_cache = xs
            return nnx.merge(graphdef, p)(x, cache=LayerCache(*layer_cache), mask=mask)

        x, new = jax.lax.scan(body, self.embed(tokens), (params, cache))
        return self._logits(x), LayerCache(*new)


def check_token_ids(tokens, vocab_size: int, name: str = "tokens") -> None:
    """Raises ``ValueError`` when concrete ``tokens`` hold an id outside ``[0, vocab_size)``
    (an embedding lookup would silently clamp it or give NaN); traced tokens are not checked."""
    if isinstance(tokens, jax.core.Tracer):
        return
    t = np.asarray(tokens)
    if t.size == 0:
        return
    lo, hi = int(t.min()), int(t.max())
    if lo < 0 or hi >= vocab_size:
        bad = np.argwhere((t < 0) | (t >= vocab_size))[0]
        raise ValueError(
            f"{name} must hold ids in [0, vocab_size = {vocab_size}), got "
            f"{int(t[tuple(bad)])} at index {bad.tolist()}"
        )


def _check_batch_size(batch_size) -> None:
    if not isinstance(batch_size, (int, np.integer)) or isinstance(batch_size, bool) or (
            batch_size < 1):
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")


def _check_cache_batch(cache, B: int, scanned: bool) -> None:
    try:
        first = cache.state if scanned else cache[0][0]
        have = first.shape[1 if scanned else 0]
    except (AttributeError, IndexError, TypeError):
        return  # the layout checks of step() name what is wrong
    if have != B:
        raise ValueError(f"cache holds {have} sequences but tokens has batch size {B}; use "
                         f"model.init_cache({B}) (or the cache of the same batch)")


def to_scanned(model: QDeltaLM) -> QDeltaLM:
    """A ``scan_layers=True`` copy of an unrolled model with the same parameters (the blocks'
    parameters stacked on a leading layer axis); computes the same function."""
    if model.config.scan_layers:
        raise ValueError("the model already has scan_layers=True")
    c = dataclasses.replace(model.config, scan_layers=True)
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: QDeltaLM(c, rngs=nnx.Rngs(0))))
    src = dict(nnx.to_flat_state(nnx.state(model)))
    flat = []
    for path, var in nnx.to_flat_state(abstract):
        if path[0] == "blocks":
            value = jnp.stack([src[("blocks", i, *path[1:])][...]
                               for i in range(c.num_hidden_layers)])
        else:
            value = src[path][...]
        flat.append((path, var.replace(value)))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


# ----------------------------------------------------------------------------- generation


def _sample(logits: Float[Array, "B vocab"], key, temperature: float, top_k: int | None):
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if top_k is not None:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "temperature", "top_k"))
def _generate(graphdef, state, prompt, lengths, rng, *, max_new_tokens, temperature, top_k):
    model = nnx.merge(graphdef, state)
    B, P = prompt.shape
    # Right padding -> left padding: row b's prompt ends at position P - 1.
    src = jnp.arange(P)[None, :] - (P - lengths[:, None])
    mask = src >= 0
    tokens = jnp.where(mask, jnp.take_along_axis(prompt, jnp.maximum(src, 0), axis=1), 0)
    logits, cache = model.step(tokens, model.init_cache(B), mask=mask)
    keys = jax.random.split(rng, max_new_tokens)
    first = _sample(logits[:, -1], keys[0], temperature, top_k)

    def body(carry, key):
        tok, cache = carry
        logits, cache = model.step(tok[:, None], cache)
        nxt = _sample(logits[:, 0], key, temperature, top_k)
        return (nxt, cache), nxt

    _, rest = jax.lax.scan(body, (first, cache), keys[1:])
    return jnp.concatenate([first[:, None], rest.T], axis=1)


def generate(
    model: QDeltaLM,
    prompt: Int[Array, "B P"],
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    rng: jax.Array | None = None,
    prompt_lengths: Int[Array, " B"] | None = None,
) -> Int[Array, "B max_new_tokens"]:
    """Samples ``max_new_tokens`` tokens after each prompt; returns only the new tokens.

    One compiled program: a masked prefill (chunked op) then ``lax.scan`` of one-token steps.

    Args:
      prompt: ``[B, P]`` int tokens. Row b's prompt is ``prompt[b, :prompt_lengths[b]]``
        (right padding; what follows is ignored). Internally rows are left-padded and the pad
        positions masked, so each row generates exactly what it would generate alone.
      max_new_tokens: >= 1.
      temperature: 0 means greedy (argmax); otherwise logits are divided by it.
      top_k: sample among the k most likely tokens only (``None``: all).
      rng: a PRNG key, required when ``temperature > 0``.
      prompt_lengths: ``[B]`` ints in ``[1, P]`` (``None``: every row has length P).

    Raises:
      ValueError for an empty prompt, lengths outside ``[1, P]``, bad temperature/top_k, or a
      missing rng.
    """
    prompt = jnp.asarray(prompt)
    if prompt.ndim != 2 or not jnp.issubdtype(prompt.dtype, jnp.integer):
        raise ValueError(f"prompt must be an integer array [B, P], got {list(prompt.shape)}")
    B, P = prompt.shape
    if P < 1:
        raise ValueError("prompt must hold at least one token (P >= 1)")
    check_token_ids(prompt, model.config.vocab_size, "prompt")
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    temperature = float(temperature)
    if not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and (not isinstance(top_k, (int, np.integer))
                              or not 1 <= top_k <= model.config.vocab_size):
        raise ValueError(f"top_k must be None or in [1, vocab_size], got {top_k!r}")
    if temperature > 0 and rng is None:
        raise ValueError("rng (a PRNG key) is required when temperature > 0")
    if rng is None:
        rng = jax.random.key(0)
    if prompt_lengths is None:
        lengths = jnp.full((B,), P, jnp.int32)
    else:
        lengths = jnp.asarray(prompt_lengths)
        if lengths.shape != (B,) or not jnp.issubdtype(lengths.dtype, jnp.integer):
            raise ValueError(f"prompt_lengths must be an integer array [B] = [{B}], got "
                             f"{lengths.dtype} {list(lengths.shape)}")
        if not isinstance(lengths, jax.core.Tracer):
            ln = np.asarray(lengths)
            if np.any(ln < 1) or np.any(ln > P):
                raise ValueError(
                    f"prompt_lengths must lie in [1, P = {P}] (empty prompts are not supported), "
                    f"got {ln.tolist()}"
                )
        lengths = lengths.astype(jnp.int32)
    graphdef, state = nnx.split(model)
    return _generate(graphdef, state, prompt.astype(jnp.int32), lengths, rng,
                     max_new_tokens=int(max_new_tokens), temperature=temperature,
                     top_k=None if top_k is None else int(top_k))
