"""Block sizes and launch settings of the Q-Delta kernels.

One :class:`StageConfig` per kernel; :class:`Config` bundles them. :func:`default_config` picks
settings from the (padded) head sizes. :func:`get_config` returns a config recorded for the
device and sizes (:func:`remember`: in memory and, optionally, in
``~/.cache/qdelta_jax/pallas_autotune.json``; :mod:`.tuning` records its winners there) before
falling back to the defaults. Nothing here times or tunes anything.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp

CACHE_FILE = Path(os.path.expanduser("~/.cache/qdelta_jax/pallas_autotune.json"))



def default_save_residuals() -> bool:
    """The ``save_residuals`` of a call whose config leaves it unset: the environment variable
    ``QDELTA_SAVE_RESIDUALS`` (unset or 1/true/yes/on: keep the residuals, the default;
    0/false/no/off: recompute them in the backward), read when the call is traced."""
    raw = os.environ.get("QDELTA_SAVE_RESIDUALS", "").strip().lower()
    if raw in ("", "1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"QDELTA_SAVE_RESIDUALS must be 1/true/yes/on or 0/false/no/off, got {raw!r}")


@dataclasses.dataclass(frozen=True)
class StageConfig:
    """Launch settings of one kernel. ``block_v`` / ``block_k``: the V / K tile where the
    kernel tiles that dimension (0 = unused)."""

    num_warps: int = 4
    num_stages: int = 1
    block_v: int = 0
    block_k: int = 0


STAGES = ("solve", "wu", "state", "output", "dd0", "reverse", "dqkw", "grads_v", "grads_k")
# Earlier names of three stages, still read from recorded configs (the autotune cache file).
OLD_NAMES = {"a": "solve", "local": "wu", "grads": "grads_v"}


@dataclasses.dataclass(frozen=True)
class Config:
    """Settings per kernel (docs/KERNELS.md has the table): ``solve`` (``chunk_solve``: A and
    its inverse T, K slices of ``block_k``), ``wu`` (``chunk_wu``: W and U from T, grid over
    chunks, K and V tiles), ``state`` (``state_pass``, grid over V tiles), ``output``
    (``chunk_output``, grid over V tiles), ``dd0`` (``chunk_dd0``: ``scale P^T dO`` before the
    reverse pass, loop over V tiles), ``reverse`` (``reverse_state_pass``, grid over V tiles),
    ``dqkw`` (``chunk_dqkw``: the state-side gradients, grid over K tiles, loop over V tiles),
    ``grads_v`` (``chunk_grads_v``: the V side of the local gradients, loop over V tiles) and
    ``grads_k`` (``chunk_grads_k``: the K side, K slices of ``block_k`` if set).

    ``save_residuals``: the forward keeps ``W, T, h_in, D`` for the backward, which then skips
    its recompute (``chunk_solve``, ``chunk_wu``, ``state_pass``) at the cost of holding them
    until the backward runs (``2 K + 4 C + 2 K V / C + 2 V`` bytes a token and head in
    bfloat16: 300 MB at B8 T4096 H6 K128 V256; on an H200 at that shape forward+backward 2.54
    instead of 3.06 ms, device time). Off: nothing per chunk is kept, as in the XLA path.

    A field left ``None`` is filled by :func:`get_config` for the call's sizes: a stage from the
    recorded (tuned) or default config, ``save_residuals`` from
    :func:`default_save_residuals` (on unless ``QDELTA_SAVE_RESIDUALS`` says otherwise). So
    ``Config(save_residuals=False)`` is a whole config for ``qdelta_rule(..., config=...)``.

    ``mosaic_block_v``: the V tile (32, 64 or 128) of the Mosaic GPU kernels where they run;
    ``None``: chosen from the grid (:func:`qdelta_jax.pallas.core.mosaic_block_v`), 64 for
    packed rows.

    ``mosaic_steps``: the pipeline depth (chunks whose loads are in flight, 1 to 4) of the
    Mosaic GPU state pass and reverse pass; ``None``: 2 for the state pass, and for the
    reverse pass 1 at V tiles of 64 (:func:`qdelta_jax.pallas.core.reverse_depth`), else 2.
    At 1 a CTA's next loads wait for its math, but at ``mosaic_block_v=64`` two CTAs fit on a
    multiprocessor (one at 2).

    ``mosaic_dqkw``: where the backward runs on the Mosaic GPU kernels
    (``implementation="pallas-mosaic"``, unpacked rows), its state-side gradients too
    (:mod:`qdelta_jax.pallas.mosaic_backward`); ``None`` or ``True``: yes, ``False``: the
    Triton kernel.

    ``mosaic_fused_dd0``: where the backward's reverse pass runs on Mosaic GPU, it forms
    ``dD0 = scale P^T dO`` itself instead of reading it from the ``chunk_dd0`` launch
    (``None`` or ``True``: yes; ``False``: the separate launch).

    ``mosaic_grads_k``: where the backward runs on the Mosaic GPU kernels, the
    K side of the local gradients too: its ``[C, C]`` part in a Triton launch, its products on
    Mosaic GPU (:func:`qdelta_jax.pallas.mosaic_backward.grads_k_products`); ``None`` or
    ``True``: yes, ``False``: the one-launch Triton K side.

    ``mosaic_fused_local``: where the backward runs on the Mosaic GPU kernels with both of the
    above, the state-side gradients and the K side's products in one Mosaic GPU kernel
    (:func:`qdelta_jax.pallas.mosaic_backward.dqkw_products`) after a Mosaic V side that forms
    ``dA`` and ``dPs`` from ``D`` (:func:`qdelta_jax.pallas.mosaic_backward.grads_v_from_d`);
    ``None`` or ``True``: yes (unpacked and packed rows), ``False``: the separate kernels
    above.

    ``mosaic_local``: where the forward runs on the Mosaic GPU kernels (the fused state pass
    and output), its local stage too (``A``, ``T``, ``W``, ``U`` in one Mosaic GPU kernel,
    :func:`qdelta_jax.pallas.mosaic_local.chunk_local`) instead of the Triton solve and W/U;
    ``None`` or ``True``: yes; ``False``: the Triton kernels."""

    solve: StageConfig | None = None
    wu: StageConfig | None = None
    state: StageConfig | None = None
    output: StageConfig | None = None
    dd0: StageConfig | None = None
    reverse: StageConfig | None = None
    dqkw: StageConfig | None = None
    grads_v: StageConfig | None = None
    grads_k: StageConfig | None = None
    save_residuals: bool | None = None
    mosaic_block_v: int | None = None
    mosaic_steps: int | None = None
    mosaic_dqkw: bool | None = None
    mosaic_fused_dd0: bool | None = None
    mosaic_grads_k: bool | None = None
    mosaic_fused_local: bool | None = None
    mosaic_local: bool | None = None

    def __post_init__(self):
        for name in STAGES:
            x = getattr(self, name)
            if x is not None and not isinstance(x, StageConfig):
                raise TypeError(f"Config.{name} must be a StageConfig or None, got {x!r}")
        for name in ("save_residuals", "mosaic_dqkw", "mosaic_fused_dd0", "mosaic_grads_k",
                     "mosaic_fused_local", "mosaic_local"):
            x = getattr(self, name)
            if x is not None and not isinstance(x, bool):
                raise TypeError(f"Config.{name} must be a bool or None, got {x!r}")
        if self.mosaic_block_v is not None and (isinstance(self.mosaic_block_v, bool) or
                                                self.mosaic_block_v not in (32, 64, 128)):
            raise ValueError(f"Config.mosaic_block_v must be 32, 64, 128 or None, got "
                             f"{self.mosaic_block_v!r}")
        if self.mosaic_steps is not None and (type(self.mosaic_steps) is not int or
                                              self.mosaic_steps not in (1, 2, 3, 4)):
            raise ValueError(f"Config.mosaic_steps must be 1, 2, 3, 4 or None, got "
                             f"{self.mosaic_steps!r}")

    @property
    def sets_stages(self) -> bool:
        """Whether any stage's settings are given (else they are chosen for the sizes)."""
        return any(getattr(self, n) is not None for n in STAGES)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Config:
        """The inverse of :meth:`to_dict`; also takes the stages' earlier names
        (``OLD_NAMES``), as configs recorded before the renaming hold them."""
        def value(k, v):
            if isinstance(v, dict):
                return StageConfig(**v)
            if v is None or k in ("mosaic_block_v", "mosaic_steps"):
                return v
            return bool(v)

        return cls(**{OLD_NAMES.get(k, k): value(k, v) for k, v in d.items()})


def default_config(K: int, V: int, chunk_size: int = 64, dtype=None) -> Config:
    """Defaults for padded head sizes ``K, V`` (powers of two >= 16): the per-stage winners of
    the H200 sweep at B8 T4096 H6 K128 V256 bf16 (docs/KERNELS.md), each checked offline for
    sm_90 (registers and spills by ptxas). Settings that hold more registers per thread as K or
    V grow fall back to the previously validated ones outside the swept sizes. For 4-byte
    ``dtype`` (float32) the tiles that would need more than the 227 KB of shared memory of an
    H100 / H200 (Triton 3.6's count: output V tile 256, dqkw 128 x 128, the reverse pass
    pipelined; at K 256 also whole-K operands in output and grads_k) are the smaller ones."""
    bv_state = min(V, 64 if K <= 128 else 32)
    # State and reverse pass: [K, BV] float32 state per program; 4 warps while it is at most
    # 128 x 64 (64 registers a thread), else 8.
    w_state = 4 if K * bv_state <= 128 * 64 else 8
    # Output: one V tile of up to 256 (the [C, BV] float32 accumulator) where K <= 128.
    bv_out = min(V, 256 if K <= 128 else 128)
    cfg = Config(
        save_residuals=True,
        wu=StageConfig(num_warps=4, num_stages=1, block_v=min(V, 64), block_k=min(K, 128)),
        state=StageConfig(num_warps=w_state, num_stages=2, block_v=bv_state),
        output=StageConfig(num_warps=4, num_stages=2, block_v=bv_out),
        reverse=StageConfig(num_warps=w_state, num_stages=2, block_v=bv_state),
        dqkw=StageConfig(num_warps=8, num_stages=2, block_v=min(V, 128), block_k=min(K, 128)),
        grads_v=StageConfig(num_warps=4, num_stages=1, block_v=min(V, 64)),
        solve=StageConfig(num_warps=1, num_stages=1, block_k=min(K, 128)),
        grads_k=StageConfig(num_warps=8, num_stages=1),
        dd0=StageConfig(num_warps=4, num_stages=1, block_v=min(V, 128)),
    )
    if (dtype is None or jnp.dtype(dtype).itemsize == 2) and K <= 128:
        # The H200 sweep at the 340M layer (bf16; BENCHMARKS.md): grads_k on 4 warps 0.646 vs
        # 0.705 ms (its K slices are slower still: 0.76 at 64), grads_v by V tiles of 128
        # 0.679 vs 0.696, dD0 pipelined 0.100 vs 0.108. Not taken at K 256, where 4 warps
        # would hold twice the registers per thread that grads_k holds now.
        cfg = dataclasses.replace(
            cfg,
            grads_v=dataclasses.replace(cfg.grads_v, block_v=min(V, 128)),
            grads_k=dataclasses.replace(cfg.grads_k, num_warps=4),
            dd0=dataclasses.replace(cfg.dd0, num_stages=2),
        )
    if dtype is not None and jnp.dtype(dtype).itemsize >= 4:
        cfg = dataclasses.replace(
            cfg,
            output=dataclasses.replace(cfg.output, block_v=min(V, 128)),
            reverse=dataclasses.replace(cfg.reverse, num_stages=1),
            dqkw=dataclasses.replace(cfg.dqkw, block_v=min(V, 64), block_k=min(K, 64)),
        )
        if K > 128:  # K 256: K slices of 128 in output and grads_k, smaller state tiles
            cfg = dataclasses.replace(
                cfg,
                state=dataclasses.replace(cfg.state, num_stages=1),
                reverse=dataclasses.replace(cfg.reverse, block_v=min(V, 16)),
                output=dataclasses.replace(cfg.output, block_v=min(V, 64), block_k=128),
                grads_k=dataclasses.replace(cfg.grads_k, block_k=128),
            )
    return cfg


def padded_size(n: int) -> int:
    """The head size the kernels run at: the next power of two, at least 16."""
    return max(16, 1 << (int(n) - 1).bit_length())


_MEMORY: dict[str, Config] = {}


def _key(K: int, V: int, chunk_size: int, dtype) -> str:
    try:
        kind = jax.devices()[0].device_kind
    except Exception:  # noqa: BLE001 - no device: the key only needs to be stable
        kind = "unknown"
    return f"{kind}|K{K}|V{V}|C{chunk_size}|{jnp.dtype(dtype).name}"


def _read_file(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def get_config(K: int, V: int, chunk_size: int, dtype, config: Config | None = None, *,
               use_file: bool = True) -> Config:
    """The whole config a call with head sizes ``K, V`` (as passed to the op) runs with: the
    fields ``config`` sets; the other stages from the config recorded for this device and these
    sizes (:func:`remember`: memory, then ``CACHE_FILE``), else :func:`default_config` of the
    padded sizes; ``save_residuals`` from :func:`default_save_residuals` unless ``config``
    sets it."""
    if config is not None and not isinstance(config, Config):
        raise TypeError(f"config must be a qdelta_jax.pallas.Config or None, got "
                        f"{type(config).__name__}")
    cfg = _lookup(K, V, chunk_size, dtype, use_file)
    given = {} if config is None else {
        f.name: getattr(config, f.name) for f in dataclasses.fields(Config)
        if getattr(config, f.name) is not None}
    if given.get("save_residuals") is None:
        given["save_residuals"] = default_save_residuals()
    return dataclasses.replace(cfg, **given)


def _lookup(K: int, V: int, chunk_size: int, dtype, use_file: bool) -> Config:
    key = _key(K, V, chunk_size, dtype)
    if key in _MEMORY:
        return _MEMORY[key]
    if use_file and CACHE_FILE.exists():
        entry = _read_file(CACHE_FILE).get(key)
        if entry is not None:
            cfg = Config.from_dict(entry)
            _MEMORY[key] = cfg
            return cfg
    return default_config(padded_size(K), padded_size(V), chunk_size, dtype)


def remember(K: int, V: int, chunk_size: int, dtype, cfg: Config, *, persist: bool = False) -> None:
    """Records ``cfg`` as the config :func:`get_config` returns for ``(this device, K, V,
    chunk_size, dtype)``, in memory and, with ``persist``, in ``CACHE_FILE`` (what
    :func:`qdelta_jax.pallas.tuning.autotune` does with its winner)."""
    key = _key(K, V, chunk_size, dtype)
    _MEMORY[key] = cfg
    if persist:
        CACHE_FILE.parent.mkdir(parents=True, exist_ok=True)
        data = _read_file(CACHE_FILE)
        data[key] = cfg.to_dict()
        CACHE_FILE.write_text(json.dumps(data, indent=1, sort_keys=True))


def split_variant(name: str) -> tuple[str, Config | None]:
    """``(implementation, Config or None)`` of an implementation name with kernel-config
    suffixes, as ``benchmarks/ops.py --impl`` and ``qdelta-check --implementations`` take them:
    ``pallas-no-save-residuals`` is ``pallas`` with ``save_residuals`` off; ``+mbvN``
    (``pallas+mbv32``) sets the Mosaic GPU kernels' V tile to N, ``+msN`` the pipeline depth
    of their state pass and reverse pass; ``+tdqkw``
    (``pallas-mosaic+tdqkw``) runs the backward's state-side gradients on the Triton kernel
    instead of Mosaic GPU's; ``+tdd0`` gives the Mosaic reverse pass ``dD0`` from the Triton
    ``chunk_dd0`` launch instead of forming it itself; ``+tgk`` (``pallas-mosaic+tgk``) runs
    the K-side local gradients in one Triton launch instead of their products on Mosaic GPU;
    ``+nfl`` keeps the state-side gradients and the K side's products in separate kernels
    (``mosaic_fused_local`` off), ``+pfl`` sets it on; ``+mloc`` runs the forward's local
    stage on Mosaic GPU (``mosaic_local`` on, the default), ``+tloc`` on Triton. A name
    without suffixes is returned with ``None``. Raises ValueError for another suffix (or a V
    tile :class:`Config` refuses)."""
    if name == "pallas-no-save-residuals":
        return "pallas", Config(save_residuals=False)
    base, *suffixes = name.split("+")
    if not suffixes:
        return base, None
    fields: dict = {}
    for sfx in suffixes:
        if sfx == "tdqkw":
            fields["mosaic_dqkw"] = False
        elif sfx == "tdd0":
            fields["mosaic_fused_dd0"] = False
        elif sfx == "tgk":
            fields["mosaic_grads_k"] = False
        elif sfx == "nfl":
            fields["mosaic_fused_local"] = False
        elif sfx == "pfl":
            fields["mosaic_fused_local"] = True
        elif sfx in ("mloc", "tloc"):
            fields["mosaic_local"] = sfx == "mloc"
        elif sfx.startswith("mbv") and sfx[3:].isdigit():
            fields["mosaic_block_v"] = int(sfx[3:])
        elif sfx.startswith("ms") and sfx[2:].isdigit():
            fields["mosaic_steps"] = int(sfx[2:])
        else:
            raise ValueError(f"unknown suffix +{sfx} in {name!r}; known: +mbvN (the Mosaic GPU "
                             "V tile, N in 32, 64, 128), +msN (its pipeline depth), +tdqkw, "
                             "+tdd0, +tgk, +nfl, +pfl, +mloc, +tloc")
    return base, Config(**fields)
