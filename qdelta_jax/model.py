"""The Q-Delta language model: config and presets, the NNX model, decoding and generation.

Model (docs/MATH.md section 4): token embedding, ``num_hidden_layers`` pre-norm blocks
``x + QDelta(RMSNorm(x))`` then ``x + SwiGLU(RMSNorm(x))``, a final RMSNorm and an untied
``lm_head`` (tied with ``tie_word_embeddings``). Logits are float32. With
``compute_dtype="bfloat16"`` activations and matmul inputs are bfloat16 while parameters stay in
``param_dtype`` (float32); the recurrent state, gates and norms are float32 throughout.

Decoding computes the same function as training:

* ``cache = model.init_cache(B)``; ``logits, cache = model.step(tokens [B, L], cache)``.
  L > 1 (prefill) runs the chunked op with the cached state as ``initial_state``; L == 1 runs
  :func:`qdelta_jax.reference.qdelta_step`, the single copy of the update. Both carry the short
  conv caches. Prefill then steps reproduce the full forward's logits at every position.
* :func:`compiled_step` is ``step`` as one compiled program with a donated cache.
* :func:`generate` is one jitted program (masked prefill, then a ``lax.while_loop`` over new
  tokens that stops when every row has emitted ``eos_id``). Prompts of different
  lengths: ``prompt[b, :prompt_lengths[b]]`` is row b's prompt (right padding, the natural
  layout); rows are moved to left padding internally and the pad positions are masked (zero
  conv input, ``beta = g = 0``), so the state after the prompt is what the unpadded prompt
  leaves and every row generates what it would generate alone.

Weight decay: :func:`weight_decay_mask` gives True for the parameters that get weight decay
(matrices, conv taps, the embedding) and False for ``A_log``, ``dt_bias``, every norm weight
(``scale``) and biases: pass it as optax's ``mask=``.

Diagnostics: ``model(tokens, return_aux=True)`` returns ``(logits, aux)`` with ``aux`` a tuple
over layers of ``dict(q, k, beta, lam, g)``: L2-normalised ``q, k [B, T, HV, K]`` (after the
grouped-head repeat, as the op sees them) and ``beta, lam, g [B, T, HV]`` float32, so that
``beta * (k . (k + lam q))`` is the stability quantity of docs/MATH.md section 1.
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
from qdelta_jax.layers import LayerCache, QDelta, RMSNorm, normalize_cu_seqlens, partitioned

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
    faster compilation for deep models); see :class:`QDeltaLM`. ``save_residuals``: the Pallas
    kernels' (see :class:`qdelta_jax.layers.QDelta`); it changes memory and speed, not results.
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


# ----------------------------------------------------------------------------- model


class SwiGLU(nnx.Module):
    """``down(SiLU(gate(x)) * up(x))``."""

    def __init__(self, hidden_size: int, intermediate_size: int, *, std: float, dtype,
                 param_dtype, rngs: nnx.Rngs):
        def linear(n_in, n_out, names):
            return nnx.Linear(n_in, n_out, use_bias=False, dtype=dtype, param_dtype=param_dtype,
                              kernel_init=partitioned(nnx.initializers.normal(std), *names),
                              rngs=rngs)

        self.gate_proj = linear(hidden_size, intermediate_size, ("embed", "mlp"))
        self.up_proj = linear(hidden_size, intermediate_size, ("embed", "mlp"))
        self.down_proj = linear(intermediate_size, hidden_size, ("mlp", "embed"))

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
            save_residuals=c.save_residuals, initializer_range=c.initializer_range, dtype=dtype,
            param_dtype=pdtype, rngs=rngs,
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


# ----------------------------------------------------------------------------- loss

# Tokens per chunk of the LM head + cross-entropy: the [chunk, vocab] float32 logits of one chunk
# (512 MiB at a 32000 vocabulary) are the most that ever exists.
LOSS_CHUNK_TOKENS = 4096


def _ce_chunks(h, w, targets, mask, chunk, dtype, with_correct, with_grads):
    """Scans ``chunk`` tokens at a time: the per-token nll (not masked), the masked correct
    count and, ``with_grads``, the gradients of the masked nll sum with respect to ``h``
    and ``w``."""
    N, D = h.shape
    n = -(-N // chunk)
    pad = n * chunk - N

    def chunks(a):
        a = jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1))
        return a.reshape(n, chunk, *a.shape[1:])

    wc = w.astype(dtype)
    vocab = w.shape[1]

    def body(dw, xs):
        x, t, m = xs
        x = x.astype(dtype)
        logits = jnp.dot(x, wc, preferred_element_type=F32)  # [chunk, vocab]
        lse = jax.nn.logsumexp(logits, axis=-1)
        picked = jnp.take_along_axis(logits, t[:, None], axis=-1)[:, 0]
        nll = lse - picked
        correct = (jnp.sum((jnp.argmax(logits, axis=-1) == t) * m) if with_correct
                   else jnp.zeros((), F32))
        if not with_grads:
            return dw, (nll, correct, None)
        # d nll / d logits = softmax - onehot(target), times the mask.
        dlogits = (jnp.exp(logits - lse[:, None])
                   - (jnp.arange(vocab)[None, :] == t[:, None])) * m[:, None]
        dlogits = dlogits.astype(dtype)
        dx = jnp.dot(dlogits, wc.T, preferred_element_type=F32).astype(h.dtype)
        dw = dw + jax.lax.dot_general(x, dlogits, (((0,), (0,)), ((), ())),
                                      preferred_element_type=F32)
        return dw, (nll, correct, dx)

    dw0 = jnp.zeros((D, vocab), F32) if with_grads else None
    dw, (nll, correct, dx) = jax.lax.scan(body, dw0, (chunks(h), chunks(targets),
                                                      chunks(mask.astype(F32))))
    nll = nll.reshape(-1)[:N]
    if with_grads:
        dx = dx.reshape(n * chunk, D)[:N]
    return nll, jnp.sum(correct), dx, dw


@partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _chunked_ce(h, w, targets, mask, chunk, dtype, with_correct):
    nll, correct, _, _ = _ce_chunks(h, w, targets, mask, chunk, dtype, with_correct, False)
    return jnp.sum(nll * mask), correct


def _chunked_ce_fwd(h, w, targets, mask, chunk, dtype, with_correct):
    # The loss is a scalar, so its gradients are computed with it, while each chunk's logits
    # exist, and the backward pass only scales them by the incoming cotangent. The weight's
    # gradient stays float32 until then: summed over chunks, it would lose bits in bfloat16.
    nll, correct, dx, dw = _ce_chunks(h, w, targets, mask, chunk, dtype, with_correct, True)
    w_like = jnp.zeros((0,), w.dtype)  # carries w's dtype to the backward pass
    return (jnp.sum(nll * mask), correct), (nll, dx, dw, w_like)


def _chunked_ce_bwd(chunk, dtype, with_correct, res, cts):
    del chunk, dtype, with_correct
    nll, dx, dw, w_like = res
    g = cts[0].astype(F32)  # the correct count has no gradient
    return ((g * dx.astype(F32)).astype(dx.dtype), (g * dw).astype(w_like.dtype), None,
            g * nll)


_chunked_ce.defvjp(_chunked_ce_fwd, _chunked_ce_bwd)


def chunked_cross_entropy(
    h: Float[Array, "*N D"],
    w: Float[Array, "D vocab"],
    targets: Int[Array, "*N"],
    mask: Float[Array, "*N"],
    *,
    compute_dtype=None,
    chunk_tokens: int = LOSS_CHUNK_TOKENS,
    return_correct: bool = False,
):
    """The LM head and the masked cross-entropy in one pass over chunks of tokens.

    ``sum(mask * (logsumexp(h @ w) - (h @ w)[target]))`` with the matmul in ``compute_dtype``
    (default ``h``'s dtype) accumulated in float32, as the model's logits are; computed
    ``chunk_tokens`` tokens at a time (a ``lax.scan``), so only one chunk's ``[chunk, vocab]``
    float32 logits exist at once, never all ``[*N, vocab]``. A ``custom_vjp`` computes the
    gradients chunk by chunk in the same pass (one matmul for the logits, one each for ``dh``
    and ``dw``: no recomputation in the backward pass).

    Args:
      h: ``[*N, D]`` final hidden states (after the final norm).
      w: ``[D, vocab]`` the output projection, any float dtype (its gradient has that dtype and
        is summed over chunks in float32).
      targets: ``[*N]`` integer ids in ``[0, vocab)``.
      mask: ``[*N]`` weights of the positions (0 or 1), cast to float32.
      return_correct: also count the masked positions whose argmax is the target (an argmax
        over the vocabulary per token: leave it off when the count is not used).

    Returns:
      ``nll_sum`` (float32 scalar), or ``(nll_sum, correct_sum)`` with ``return_correct``.

    Raises:
      ValueError: for shapes that do not match, or ``chunk_tokens`` not a positive integer.
      TypeError: for non-integer ``targets``.
    """
    if h.ndim < 2 or w.ndim != 2 or w.shape[0] != h.shape[-1]:
        raise ValueError(f"h must be [*N, D] and w [D, vocab] with the same D, got h "
                         f"{list(h.shape)} and w {list(w.shape)}")
    lead = tuple(h.shape[:-1])
    if tuple(targets.shape) != lead or tuple(mask.shape) != lead:
        raise ValueError(f"targets and mask must have h's leading shape {list(lead)}, got "
                         f"{list(targets.shape)} and {list(mask.shape)}")
    if not jnp.issubdtype(targets.dtype, jnp.integer):
        raise TypeError(f"targets must be integer token ids, got {targets.dtype}")
    if not isinstance(chunk_tokens, (int, np.integer)) or isinstance(chunk_tokens, bool) or (
            chunk_tokens < 1):
        raise ValueError(f"chunk_tokens must be a positive integer, got {chunk_tokens!r}")
    N = math.prod(lead)
    dtype = jnp.dtype(compute_dtype if compute_dtype is not None else h.dtype)
    with jax.named_scope("lm_head_loss"):  # the name profiles of the train step look for
        nll, correct = _chunked_ce(h.reshape(N, h.shape[-1]), w, targets.reshape(N),
                                   mask.reshape(N).astype(F32),
                                   int(min(chunk_tokens, max(N, 1))), dtype,
                                   bool(return_correct))
    return (nll, correct) if return_correct else nll


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
                               embedding_init=partitioned(
                                   nnx.initializers.normal(c.initializer_range), "vocab", "embed"),
                               rngs=rngs)
        if c.scan_layers:
            @nnx.split_rngs(splits=c.num_hidden_layers)
            @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
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
                kernel_init=partitioned(nnx.initializers.normal(c.initializer_range), "embed",
                                        "vocab"),
                preferred_element_type=F32, rngs=rngs,
            )

    def _logits(self, x: Array) -> Float[Array, "B T vocab"]:
        x = self.norm(x)
        if self.lm_head is None:
            w = self.embed.embedding[...].astype(self.dtype)
            return jnp.einsum("btd,vd->btv", x.astype(self.dtype), w,
                              preferred_element_type=F32)
        return self.lm_head(x).astype(F32)

    def _head_weight(self) -> Float[Array, "D vocab"]:
        """The output projection ``[D, vocab]`` in its storage dtype."""
        if self.lm_head is None:
            return self.embed.embedding[...].T
        return self.lm_head.kernel[...]

    def _check_tokens(self, tokens, name: str = "tokens"):
        if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(
                f"{name} must be an integer array [B, T], got {tokens.dtype} {list(tokens.shape)}"
            )
        check_token_ids(tokens, self.config.vocab_size, name)

    def hidden(
        self,
        tokens: Int[Array, "B T"],
        *,
        cu_seqlens: Int[Array, "B S+1"] | None = None,
        return_aux: bool = False,
    ):
        """The residual stream after the last block, before the final norm: ``[B, T, D]``
        (``(x, aux)`` with ``return_aux``). ``cu_seqlens`` as in :meth:`__call__`."""
        self._check_tokens(tokens)
        B, T = tokens.shape
        if cu_seqlens is not None:
            cu_seqlens = normalize_cu_seqlens(cu_seqlens, B, T)
        x = self.embed(tokens)
        if self.config.scan_layers:
            x, aux = self._scan_blocks(x, cu_seqlens, return_aux)
            return (x, aux) if return_aux else x
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
        return (x, tuple(aux)) if return_aux else x

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
        out = self.hidden(tokens, cu_seqlens=cu_seqlens, return_aux=return_aux)
        if return_aux:
            return self._logits(out[0]), out[1]
        return self._logits(out)

    def loss(
        self,
        tokens: Int[Array, "B T"],
        targets: Int[Array, "B T"],
        mask: Float[Array, "B T"],
        *,
        cu_seqlens: Int[Array, "B S+1"] | None = None,
        chunk_tokens: int = LOSS_CHUNK_TOKENS,
        return_correct: bool = False,
    ):
        """The masked next-token cross-entropy, summed (not averaged) over ``B * T``, through
        :func:`chunked_cross_entropy`: never holds the ``[B, T, vocab]`` logits.

        Returns ``nll_sum`` (float32 scalar), or ``(nll_sum, correct_sum)`` with
        ``return_correct`` (the number of masked positions whose argmax is the target).
        Equals ``sum(mask * (logsumexp(logits) - logits[target]))`` of :meth:`__call__`'s
        logits, gradients included.
        """
        h = self.norm(self.hidden(tokens, cu_seqlens=cu_seqlens))
        return chunked_cross_entropy(h, self._head_weight(), targets, mask,
                                     compute_dtype=self.dtype, chunk_tokens=chunk_tokens,
                                     return_correct=return_correct)

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

        L > 1 runs the chunked op (prefill), L == 1 the one-token update (the fused Pallas
        kernel where the layers' ``decode_implementation()`` is ``"pallas"``, the GPU default).
        ``mask`` (False at left padding, or at rows that have finished) keeps those positions
        from touching the state and the conv caches. :func:`compiled_step` wraps this in one
        compiled program that donates the cache.

        Raises ValueError for a cache of another layer count or batch size, or a mask of
        another shape than ``tokens``.
        """
        self._check_tokens(tokens)
        B = tokens.shape[0]
        if mask is not None and tuple(mask.shape) != tuple(tokens.shape):
            raise ValueError(f"mask must have the shape of tokens {list(tokens.shape)}, got "
                             f"{list(mask.shape)}")
        if self.config.scan_layers:
            return self._scan_step(tokens, cache, mask)
        if not isinstance(cache, (tuple, list)) or len(cache) != len(self.blocks):
            n = len(cache) if isinstance(cache, (tuple, list)) else type(cache).__name__
            raise ValueError(f"cache has {n} layers, the model {len(self.blocks)} (a tuple of "
                             "LayerCache, as init_cache returns)")
        _check_cache_batch(LayerCache(*cache[0]).state.shape[0], B)
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
        _check_cache_batch(cache.state.shape[1], tokens.shape[0])
        graphdef, params = nnx.split(self.blocks)

        def body(x, xs):
            p, layer_cache = xs
            return nnx.merge(graphdef, p)(x, cache=LayerCache(*layer_cache), mask=mask)

        x, new = jax.lax.scan(body, self.embed(tokens), (params, cache))
        return self._logits(x), LayerCache(*new)


def _check_cache_batch(cache_batch: int, batch: int) -> None:
    if cache_batch != batch:
        raise ValueError(f"the cache holds {cache_batch} sequences but tokens has batch size "
                         f"{batch}; make it with init_cache({batch})")


@partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("cache",))
def _jit_step(graphdef, state, tokens, cache, mask):
    return nnx.merge(graphdef, state).step(tokens, cache, mask=mask)


def compiled_step(model: QDeltaLM):
    """``model.step`` as one compiled program (every layer, the embedding and the logits) whose
    cache argument is donated, so each layer's state is updated in place.

    Returns ``step(tokens [B, L], cache, mask=None) -> (logits [B, L, vocab], new_cache)``; the
    cache passed in must not be used again. The parameters are the model's at the time of the
    call (a later change to the model is not seen). One compilation per shape of ``tokens``."""
    graphdef, state = nnx.split(model)

    def step(tokens, cache, mask=None):
        return _jit_step(graphdef, state, jnp.asarray(tokens), cache,
                         None if mask is None else jnp.asarray(mask))

    return step


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


def _sample(logits: Float[Array, "B vocab"], key, temperature: float, top_k: int | None,
            top_p: float | None = None) -> Int[Array, " B"]:
    """Next tokens: argmax at temperature 0 (``key`` unused), else a draw from
    ``softmax(logits / temperature)`` restricted to the ``top_k`` most likely tokens and to the
    nucleus: the most likely tokens whose more likely predecessors hold less than ``top_p`` of
    the probability (the most likely token always stays; ties at the edge stay together)."""
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(F32) / temperature
    if top_k is not None:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p is not None and top_p < 1.0:
        desc = -jnp.sort(-logits, axis=-1)
        probs = jax.nn.softmax(desc, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs
        edge = jnp.min(jnp.where(before < top_p, desc, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < edge, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "temperature", "top_k", "top_p",
                                   "eos_id"))
def _generate(graphdef, state, prompt, lengths, rng, *, max_new_tokens, temperature, top_k,
              top_p, eos_id):
    model = nnx.merge(graphdef, state)
    B, P = prompt.shape
    N = max_new_tokens
    # Right padding -> left padding: row b's prompt ends at position P - 1.
    src = jnp.arange(P)[None, :] - (P - lengths[:, None])
    mask = src >= 0
    tokens = jnp.where(mask, jnp.take_along_axis(prompt, jnp.maximum(src, 0), axis=1), 0)
    logits, cache = model.step(tokens, model.init_cache(B), mask=mask)
    keys = jax.random.split(rng, N)
    sample = partial(_sample, temperature=temperature, top_k=top_k, top_p=top_p)
    first = sample(logits[:, -1], keys[0])
    fill = 0 if eos_id is None else eos_id
    out = jnp.full((B, N), fill, jnp.int32).at[:, 0].set(first)
    done = jnp.zeros((B,), bool) if eos_id is None else first == eos_id

    def cond(carry):
        i, _, _, done, _, _ = carry
        return (i < N) & ~jnp.all(done)

    def body(carry):
        i, tok, cache, done, out, n = carry
        # Finished rows are masked: their state and conv caches stay as they are.
        live = None if eos_id is None else ~done[:, None]
        logits, cache = model.step(tok[:, None], cache, mask=live)
        nxt = jnp.where(done, fill, sample(logits[:, 0], keys[i]))
        out = jax.lax.dynamic_update_slice(out, nxt[:, None], (0, i))
        n = n + (~done).astype(jnp.int32)
        if eos_id is not None:
            done = done | (nxt == eos_id)
        return i + 1, nxt, cache, done, out, n

    init = (jnp.int32(1), first, cache, done, out, jnp.ones((B,), jnp.int32))
    _, _, _, _, out, n = jax.lax.while_loop(cond, body, init)
    return out, n


def generate(
    model: QDeltaLM,
    prompt: Int[Array, "B P"],
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    rng: jax.Array | None = None,
    prompt_lengths: Int[Array, " B"] | None = None,
    eos_id: int | None = None,
    return_lengths: bool = False,
):
    """Samples up to ``max_new_tokens`` tokens after each prompt; returns only the new tokens.

    One compiled program: a masked prefill (chunked op), then a ``lax.while_loop`` of one-token
    steps that ends when every row has emitted ``eos_id`` or after ``max_new_tokens`` tokens.

    Args:
      prompt: ``[B, P]`` int tokens in ``[0, vocab_size)``. Row b's prompt is
        ``prompt[b, :prompt_lengths[b]]`` (right padding; what follows is ignored). Internally
        rows are left-padded and the pad positions masked, so each row generates exactly what
        it would generate alone.
      max_new_tokens: >= 1.
      temperature: 0 means greedy (argmax; no ``rng`` needed); otherwise logits are divided by it.
      top_k: sample among the k most likely tokens only (``None``: all).
      top_p: nucleus sampling, in ``(0, 1]``: sample among the most likely tokens whose more
        likely predecessors hold less than ``top_p`` of the probability (``None`` or 1: all).
        With ``top_k`` too, the nucleus is taken of the top-k distribution.
      rng: a PRNG key, required when ``temperature > 0``.
      prompt_lengths: ``[B]`` ints in ``[1, P]`` (``None``: every row has length P).
      eos_id: end-of-sequence token: a row stops after emitting it (the token is kept, later
        positions hold ``eos_id``, and the row's state is no longer updated). ``None``: every
        row generates ``max_new_tokens``.
      return_lengths: also return the generated lengths ``[B]`` int32 (the number of tokens up
        to and including the row's first ``eos_id``; ``max_new_tokens`` for a row without one).

    Returns:
      ``tokens [B, max_new_tokens]`` int32, or ``(tokens, lengths)`` with ``return_lengths``.

    Raises:
      ValueError for an empty prompt, prompt ids outside the vocabulary, lengths outside
      ``[1, P]``, bad ``max_new_tokens``, ``temperature``, ``top_k``, ``top_p`` or ``eos_id``,
      or a missing rng.
    """
    vocab = model.config.vocab_size
    prompt = jnp.asarray(prompt)
    if prompt.ndim != 2 or not jnp.issubdtype(prompt.dtype, jnp.integer):
        raise ValueError(f"prompt must be an integer array [B, P], got {prompt.dtype} "
                         f"{list(prompt.shape)}")
    B, P = prompt.shape
    if P < 1:
        raise ValueError("prompt must hold at least one token (P >= 1)")
    check_token_ids(prompt, vocab, "prompt")
    if (not isinstance(max_new_tokens, (int, np.integer)) or isinstance(max_new_tokens, bool)
            or max_new_tokens < 1):
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    temperature = float(temperature)
    if not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and (not isinstance(top_k, (int, np.integer))
                              or not 1 <= top_k <= vocab):
        raise ValueError(f"top_k must be None or in [1, vocab_size], got {top_k!r}")
    if top_p is not None:
        top_p = float(top_p)
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be None or in (0, 1], got {top_p}")
    if eos_id is not None and (not isinstance(eos_id, (int, np.integer))
                               or not 0 <= eos_id < vocab):
        raise ValueError(f"eos_id must be None or in [0, vocab_size = {vocab}), got {eos_id!r}")
    if temperature > 0 and rng is None:
        raise ValueError("rng (a PRNG key) is required when temperature > 0")
    if rng is None:
        rng = jax.random.key(0)  # unused by greedy decoding
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
    out, n = _generate(graphdef, state, prompt.astype(jnp.int32), lengths, rng,
                       max_new_tokens=int(max_new_tokens), temperature=temperature,
                       top_k=None if top_k is None else int(top_k),
                       top_p=None if top_p is None or top_p == 1.0 else top_p,
                       eos_id=None if eos_id is None else int(eos_id))
    return (out, n) if return_lengths else out
