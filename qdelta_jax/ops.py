"""``qdelta_rule``: the public Q-Delta op. Input checks, q/k normalisation and dispatch.

Implementations (``implementation=``):

* ``"reference"`` -- :func:`qdelta_jax.reference.qdelta_scan`, a ``lax.scan`` over time; the
  definition. Slow, and its autodiff keeps every per-token state: use it to check things.
* ``"xla"`` -- :mod:`qdelta_jax.xla`, the chunkwise form in plain ``jnp`` with an analytic
  ``custom_vjp``; runs on every backend.
* ``"pallas"`` -- :mod:`qdelta_jax.pallas`, GPU kernels (Pallas) behind the same chunked layout;
  on a machine without a GPU they run in Pallas interpret mode (slow; for tests). On Hopper
  GPUs (bfloat16 or float16, chunk 64, K a multiple of 64 up to 256) the Mosaic GPU kernels
  run the call, training and packed rows included: the local stage, the fused state pass and
  output (which also writes the backward's residuals), and the backward's reverse pass and
  local gradients; elsewhere the Triton-lowered kernels, the reason in the
  ``qdelta_jax.pallas.core`` debug log. ``"pallas-triton"`` never uses the Mosaic kernels;
  ``"pallas-mosaic"`` insists on them and raises a ValueError that says why where they cannot
  run. Timings of both on an H200 are in BENCHMARKS.md.

``None`` picks ``"pallas"`` on GPUs and ``"xla"`` elsewhere.

Meshes: a Pallas kernel is one opaque custom call to XLA's sharding propagation, which would
gather a batch-sharded input onto every device and run the whole batch everywhere. So when the
op is traced under a mesh (``with jax.set_mesh(mesh):``, as ``qdelta_jax.train`` does) whose
batch axes (``batch_axes``, by default ``"data"`` and ``"fsdp"``) have more than one device
and divide the batch, the ``"pallas"`` path runs inside ``jax.shard_map``: each device computes
its own rows. The ``"xla"`` and ``"reference"`` paths
are ordinary XLA and partition by themselves.

All checks read only shapes and dtypes (and the values of ``cu_seqlens`` when they are concrete),
so they run once at trace time and cost nothing in a compiled step. Shapes use the letters of
:mod:`qdelta_jax.array_typing`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from qdelta_jax import nonfinite, packing, reference
from qdelta_jax.array_typing import QK, HeadScalars, Offsets, States, Values

IMPLEMENTATIONS = ("reference", "xla", "pallas", "pallas-triton", "pallas-mosaic")


def _fmt(shape) -> str:
    return "[" + ", ".join(str(s) for s in shape) + "]"


def _check_float(name: str, x) -> None:
    if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
        raise TypeError(f"{name} must have a floating dtype (float32 or bfloat16), got {x.dtype}")


def _check_shape(name: str, x, expected: tuple, legend: str) -> None:
    if tuple(x.shape) != tuple(expected):
        raise ValueError(
            f"{name} must have shape {legend} = {_fmt(expected)}, got {_fmt(x.shape)}"
        )


#: Mesh axes over which the ``"pallas"`` path splits the batch by default (``batch_axes``).
DEFAULT_BATCH_AXES: tuple[str, ...] = ("data", "fsdp")


def _check_batch_axes(axes) -> tuple[str, ...]:
    if isinstance(axes, str) or not all(isinstance(a, str) for a in axes):
        raise TypeError(f"batch_axes must be a sequence of mesh axis names, got {axes!r}")
    return tuple(axes)


def batch_split(batch: int, axes=DEFAULT_BATCH_AXES):
    """``(mesh, axes)`` when the mesh in context splits a batch of ``batch`` rows over the mesh
    axes ``axes`` (axes of size 1, manual axes and absent axes are left out), else ``None``."""
    axes = _check_batch_axes(axes)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        return None
    manual = set(getattr(mesh, "manual_axes", ()) or ())
    shape = dict(mesh.shape)
    axes = tuple(a for a in axes if shape.get(a, 1) > 1 and a not in manual)
    n = math.prod(shape[a] for a in axes)
    if not axes or batch % n:
        return None
    return mesh, axes


def shard_over_batch(fn, batch: int, axes=DEFAULT_BATCH_AXES):
    """``fn`` (every input and output leaf has the batch as its leading axis; ``None`` allowed)
    run with ``jax.shard_map`` over the mesh axes ``axes`` of the mesh in context, or ``fn``
    itself when there is no such mesh (see :func:`batch_split`)."""
    split = batch_split(batch, axes)
    if split is None:
        return fn
    mesh, axes = split
    spec = jax.sharding.PartitionSpec(axes)
    return jax.shard_map(fn, mesh=mesh, in_specs=spec, out_specs=spec, check_vma=False)


def _check_values(**arrays) -> None:
    """Host-side value checks of :func:`qdelta_rule`'s ``check_values``."""

    def check(name, x):
        x = np.asarray(x, np.float64)
        bad = ~np.isfinite(x)
        what = "finite"
        if name == "g":
            bad = np.isnan(x) | (x > 0)
            what = "<= 0 (log decay; -inf is a full reset)"
        if bad.any():
            idx = tuple(int(i) for i in np.argwhere(bad)[0])
            raise ValueError(f"{name} must be {what}: {name}{list(idx)} = {x[idx]}")

    for name, x in arrays.items():
        if x is not None:
            jax.debug.callback(lambda x, name=name: check(name, x), x)


def default_implementation(chunk_size: int = 64, K: int | None = None,
                           V: int | None = None) -> str:
    """``"pallas"`` when the default backend is a GPU and the kernels take ``chunk_size`` (and
    the head sizes ``K``, ``V`` where given), else ``"xla"``."""
    if jax.default_backend() != "gpu":
        return "xla"
    from qdelta_jax import pallas

    if chunk_size not in pallas.CHUNK_SIZES:
        return "xla"
    if (K is not None and K > pallas.MAX_K) or (V is not None and V > pallas.MAX_V):
        return "xla"
    return "pallas"


def qdelta_rule(
    q: QK,
    k: QK,
    v: Values,
    g: HeadScalars,
    beta: HeadScalars,
    lam: HeadScalars,
    *,
    scale: float | None = None,
    initial_state: States | None = None,
    output_final_state: bool = False,
    normalize_qk: bool = True,
    check_values: bool = False,
    cu_seqlens: Offsets | packing.Documents | None = None,
    chunk_size: int = 64,
    implementation: str | None = None,
    config=None,
    batch_axes: tuple[str, ...] = DEFAULT_BATCH_AXES,
    guard_nonfinite: bool = False,
) -> tuple[Values, States | None]:
    """The Q-Delta recurrence (docs/MATH.md section 1) over a batch of sequences.

    **q and k are L2-normalised inside the op by default** (``normalize_qk=True``:
    ``x / sqrt(sum(x ** 2) + 1e-6)`` over K, in float32, the normalisation of fla's ``l2norm``),
    because the recurrence contracts only for unit keys (docs/MATH.md, Lemma 3.1) and the
    authors' layer always normalises. fla's ``chunk_gated_delta_rule`` defaults the other way,
    ``use_qk_l2norm_in_kernel=False``: it takes q and k as given. So a call ported from fla
    without that flag must pass ``normalize_qk=False`` here to compute the same function (and
    ``use_qk_l2norm_in_kernel=True`` there is this op's default). ``scale`` never enters the
    normalisation or ``x = k + lam q``; it multiplies the output only.

    Grouped value heads, as fla's op takes them: ``v``, ``g``, ``beta``, ``lam`` and the states
    have HV heads, ``q`` and ``k`` H heads, HV a multiple of H; value head ``j`` reads query and
    key head ``j // (HV // H)``. Every implementation sees q and k repeated to HV heads inside
    the op (exact: the gradients of q and k are the sums over their group).

    Args:
      q, k: ``[B, T, H, K]`` queries and keys, float32 or bfloat16.
      v: ``[B, T, HV, V]`` values (HV = H unless the value heads are grouped); ``o`` gets
        this dtype.
      g: ``[B, T, HV]`` log decay (``a_t = exp(g_t)``, ``g <= 0``).
      beta: ``[B, T, HV]`` write strength. lam: ``[B, T, HV]`` query mixing ``x = k + lam q``.
      scale: output scale, default ``K ** -0.5``; it touches the output only.
      initial_state: ``[N, HV, K, V]`` state entering each sequence (``N = B``; with
        ``cu_seqlens`` one per packed document: ``N``, or ``B S`` for per-row offsets, document
        ``s`` of row ``b`` at ``b S + s``); zero when ``None``.
      output_final_state: return the float32 ``[N, HV, K, V]`` final states (else ``None``).
      normalize_qk: L2-normalise ``q`` and ``k`` over K inside the op (default; see above).
      check_values: check the values where the op is defined when it runs (a debugging aid:
        one host callback per call): every input finite except ``g``, which must be ``<= 0``
        (``-inf`` is allowed: a full reset). A violation raises an error naming the argument,
        the first bad index and its value (inside ``jit`` it surfaces when the result is
        computed). Off by default: the op then trusts its inputs (``g > 0`` grows the state;
        a non-finite value spoils later tokens of its document and head as in the recurrence,
        and on the chunked paths also the earlier tokens of its chunk unless
        ``guard_nonfinite``).
      guard_nonfinite: on the chunked implementations, spoil with a NaN or inf exactly what
        the recurrence spoils: outputs and gradients non-finite where the scan's are, nothing
        earlier in the chunk (:mod:`qdelta_jax.nonfinite`: where the outputs are not all
        finite, the call runs again on cleaned inputs). Off by default because it is not free:
        with finite values it still costs a reduction over the outputs and a ``lax.cond`` (a
        host round trip on the GPU), on an H200 16% of the forward at the 340M layer (31% with
        packed documents), 5% of forward+backward, and a second copy of the kernels to
        compile. Off, a non-finite input also spoils the earlier tokens of its chunk (masked
        products multiply it by 0); finite inputs give the same values either way.
      cu_seqlens: packed documents (:mod:`qdelta_jax.packing`): ``[N + 1]`` integer offsets of
        the documents of one row (``B == 1``), or ``[B, S + 1]`` offsets per row (each row from
        0 to T, padded by repeating T), or the :class:`qdelta_jax.packing.Documents` made of
        them (then not checked again). The state resets at every offset. Without states in or
        out, documents cost no padding: chunks tile the rows and a boundary may fall inside a
        chunk.
      chunk_size: chunk length C of the chunked implementations, a power of two.
      implementation: ``"reference"``, ``"xla"``, ``"pallas"`` (or ``"pallas-triton"`` /
        ``"pallas-mosaic"`` to choose the forward kernels), or ``None`` (fastest available).
      config: a :class:`qdelta_jax.pallas.Config` for the Pallas kernels (the other
        implementations ignore it), whole or partial: ``Config(save_residuals=False)`` makes
        the backward recompute the forward's per-chunk residuals instead of keeping them (less
        memory, slower); fields left ``None`` take the tuned or default settings for the head
        sizes and ``save_residuals`` the ``QDELTA_SAVE_RESIDUALS`` default (on).
      batch_axes: the mesh axes the Pallas path splits the batch over when traced under a mesh
        (see the module docstring); ``()`` never splits.

    Returns:
      ``(o, final_state)``: ``o [B, T, HV, V]`` in ``v``'s dtype; ``final_state`` or ``None``.

    Raises:
      ValueError / TypeError naming the argument for wrong shapes, dtypes or settings (HV not
      a multiple of H among them).
    """
    if implementation is not None and implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"implementation must be one of {IMPLEMENTATIONS} or None, got {implementation!r}"
        )
    batch_axes = _check_batch_axes(batch_axes)
    if config is not None:
        from qdelta_jax.pallas.config import Config

        if not isinstance(config, Config):
            raise TypeError(f"config must be a qdelta_jax.pallas.Config or None, got "
                            f"{type(config).__name__}")
    for name, x in (("q", q), ("k", k), ("v", v), ("g", g), ("beta", beta), ("lam", lam)):
        if not hasattr(x, "shape") or not hasattr(x, "dtype"):
            raise TypeError(f"{name} must be an array, got {type(x).__name__}")
        _check_float(name, x)
    if q.ndim != 4:
        raise ValueError(f"q must have shape [B, T, H, K], got {_fmt(q.shape)}")
    B, T, H, K = q.shape
    _check_shape("k", k, (B, T, H, K), "[B, T, H, K]")
    HV = v.shape[2] if v.ndim == 4 else H
    hv = "H" if HV == H else "HV"  # the legend names HV only where the value heads are grouped
    if v.ndim != 4 or tuple(v.shape[:2]) != (B, T):
        raise ValueError(
            f"v must have shape [B, T, {hv}, V] = {_fmt((B, T, HV, 'V'))}, got {_fmt(v.shape)}"
        )
    V = v.shape[-1]
    if H and HV % H:
        raise ValueError(
            f"v has HV = {HV} value heads, which must be a multiple of the H = {H} heads of q "
            f"and k (grouped value heads); got q {_fmt(q.shape)}, v {_fmt(v.shape)}"
        )
    for name, x in (("g", g), ("beta", beta), ("lam", lam)):
        _check_shape(name, x, (B, T, HV), f"[B, T, {hv}]")
    if implementation is None:  # the head sizes are known from here on
        implementation = default_implementation(chunk_size, K, V)
    if T == 0 or K == 0 or V == 0 or H == 0 or HV == 0:
        raise ValueError(f"q and v must have non-empty T, H, K, V, got q {_fmt(q.shape)}, "
                         f"v {_fmt(v.shape)}")
    if not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1 or (
        chunk_size & (chunk_size - 1)
    ):
        raise ValueError(f"chunk_size must be a power of two (16, 32, 64, 128), got {chunk_size!r}")
    if scale is None:
        scale = K**-0.5
    elif not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite float or None, got {scale!r}")
    docs = None if cu_seqlens is None else packing.documents(cu_seqlens, B, T)
    N = B if docs is None else docs.num_states
    if initial_state is not None:
        _check_float("initial_state", initial_state)
        _check_shape("initial_state", initial_state, (N, HV, K, V), f"[N, {hv}, K, V]")

    if check_values:
        _check_values(q=q, k=k, v=v, g=g, beta=beta, lam=lam, initial_state=initial_state)
    if normalize_qk:
        if implementation.startswith("pallas"):  # one kernel each way, not XLA's two passes
            from qdelta_jax.pallas import l2norm

            q, k = l2norm.l2_normalize(q), l2norm.l2_normalize(k)
        else:
            q = reference.l2_normalize(q).astype(q.dtype)
            k = reference.l2_normalize(k).astype(k.dtype)
    if HV != H:  # grouped value heads: value head j reads q/k head j // (HV // H)
        q, k = jnp.repeat(q, HV // H, axis=2), jnp.repeat(k, HV // H, axis=2)

    if implementation == "reference":
        o, final = reference.qdelta_scan(
            q, k, v, g, beta, lam, scale=float(scale), initial_state=initial_state,
            cu_seqlens=docs,
        )
    else:
        from qdelta_jax import xla

        core = None
        if implementation.startswith("pallas"):
            from qdelta_jax import pallas

            backend = {"pallas": "auto", "pallas-triton": "triton", "pallas-mosaic": "mosaic"}
            core = pallas.make_core(K=K, V=V, dtype=q.dtype, chunk_size=chunk_size,
                                    config=config, forward_backend=backend[implementation])

        def run(q, k, v, g, beta, lam, initial_state, docs):
            return xla.qdelta_chunked(
                q, k, v, g, beta, lam, scale=float(scale), initial_state=initial_state,
                output_final_state=output_final_state, cu_seqlens=docs,
                chunk_size=int(chunk_size), core=core,
            )

        # The one place that decides the split over a mesh: only the kernels need it (XLA
        # partitions the rest). Documents keep the batch axis, so packed rows split like unpacked
        # ones (their states, [B S, ...] row-major, split by rows too).
        if core is not None:
            run = shard_over_batch(run, B, batch_axes)
        if guard_nonfinite:  # NaN, inf spoil what the scan spoils, nothing earlier
            o, final = nonfinite.call(run, q, k, v, g, beta, lam, initial_state, docs)
        else:
            o, final = run(q, k, v, g, beta, lam, initial_state, docs)
    return o.astype(v.dtype), (final if output_final_state else None)
