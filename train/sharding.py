"""Device mesh, sharding rules and multi-host start-up.

The mesh has two axes, ``("data", "fsdp")``, from ``--mesh data=4,fsdp=2`` (default: every device
on ``data``). The batch axis of every batch array is split over both axes, so each device sees
``B / (data * fsdp)`` rows.

Parameters are sharded by their logical axis names (the partitioning metadata every parameter of
:mod:`qdelta_jax.layers` and :mod:`qdelta_jax.model` carries: ``"embed"``, ``"qk"``, ``"v"``,
``"heads"``, ``"conv"``, ``"norm"``, ``"vocab"``, ``"mlp"``, ``"layers"``) through
:data:`LOGICAL_RULES`, pairs ``(logical name, mesh axis or None)`` in Flax's logical-axis-rules
form. Each dimension takes the first rule of its name whose mesh axis is not already used by an
earlier dimension of the same parameter and whose size divides the dimension; otherwise it is
replicated. So the large matrices are split over ``"fsdp"`` along one dimension (``embed``
first), and the per-head vectors (``A_log``, ``dt_bias``), norm weights and conv taps are
replicated. The optimizer state's moments and the float32 master copy get the spec of the
parameter they mirror; its scalars are replicated. XLA inserts the all-gathers and
reduce-scatters that this layout needs; with ``fsdp = 1`` it is plain data parallelism.

The loss is a sum over the whole global batch divided by the count of masked positions, so every
mesh computes the same function of the same batch; only the order of floating-point reductions
changes with the device count (last-bit differences, not bitwise equality).
"""

from __future__ import annotations

import math
import os
import re
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

AXES = ("data", "fsdp")
BATCH_SPEC = PartitionSpec(AXES)

#: Logical axis name -> mesh axis (or ``None``: replicated), in priority order (see the module
#: docstring). Pass other rules to :func:`tree_shardings` to lay parameters out differently.
LOGICAL_RULES: tuple[tuple[str, str | None], ...] = (
    ("embed", "fsdp"),
    ("vocab", "fsdp"),
    ("mlp", "fsdp"),
    ("qk", "fsdp"),
    ("v", "fsdp"),
    ("heads", None),
    ("conv", None),
    ("norm", None),
    ("layers", None),
)


class MeshError(ValueError):
    """A bad ``--mesh`` value."""

    flag = "--mesh"


def parse_mesh(spec: str | None, n_devices: int) -> dict[str, int]:
    """``"data=4,fsdp=2"`` -> ``{"data": 4, "fsdp": 2}``. A missing axis takes what is left
    (``"fsdp=2"`` on 8 devices is ``data=4``); ``-1`` also means "the rest". Raises
    :class:`MeshError` for malformed strings, unknown axes or sizes whose product is not
    ``n_devices``."""
    sizes: dict[str, int] = {}
    if spec:
        for part in spec.split(","):
            m = re.fullmatch(r"\s*([A-Za-z_]+)\s*[=:]\s*(-?\d+)\s*", part)
            if not m:
                raise MeshError(
                    f"--mesh {spec!r}: expected AXIS=SIZE pairs separated by commas, "
                    "e.g. data=4,fsdp=2"
                )
            axis, size = m.group(1), int(m.group(2))
            if axis not in AXES:
                raise MeshError(f"--mesh {spec!r}: unknown axis {axis!r}; axes are data, fsdp")
            if axis in sizes:
                raise MeshError(f"--mesh {spec!r}: axis {axis!r} given twice")
            if size == 0 or size < -1:
                raise MeshError(f"--mesh {spec!r}: sizes must be >= 1 (or -1 for the rest)")
            sizes[axis] = size
    free = [a for a in AXES if sizes.get(a, -1) == -1]
    fixed = math.prod(v for v in sizes.values() if v != -1)
    if len(free) == 2:
        sizes = {"data": n_devices, "fsdp": 1}
    elif len(free) == 1:
        if n_devices % fixed:
            raise MeshError(
                f"--mesh {spec!r}: {fixed} does not divide the {n_devices} available devices"
            )
        sizes[free[0]] = n_devices // fixed
    if math.prod(sizes.values()) != n_devices:
        raise MeshError(
            f"--mesh {spec!r}: data x fsdp = {sizes['data']} x {sizes['fsdp']} = "
            f"{math.prod(sizes.values())}, but there are {n_devices} devices"
        )
    return {a: sizes[a] for a in AXES}


def make_mesh(spec: str | None = None, devices=None) -> Mesh:
    devices = list(jax.devices() if devices is None else devices)
    sizes = parse_mesh(spec, len(devices))
    return Mesh(np.array(devices).reshape(sizes["data"], sizes["fsdp"]), AXES)


def logical_axes(params) -> Any:
    """The logical axis names of every parameter: ``params`` is an NNX module or its
    ``nnx.State`` (a model built with ``nnx.eval_shape`` costs no memory); returns a nested dict
    shaped like ``nnx.to_pure_dict(nnx.state(params, nnx.Param))`` with a tuple of names per
    parameter. Raises ``ValueError`` naming a parameter without names, or whose names do not
    match its number of dimensions."""
    from flax import nnx

    state = params if isinstance(params, nnx.State) else nnx.state(params, nnx.Param)
    specs = nnx.get_partition_spec(state)  # PartitionSpec(*names), the same on flax 0.12.x
    shapes = dict(nnx.to_flat_state(state))
    flat = []
    for path, spec in nnx.to_flat_state(specs):
        names = tuple(spec.get_value())
        shape = np.shape(shapes[path].get_value())
        if len(names) != len(shape):
            where = ".".join(str(p) for p in path)
            what = "no logical axis names" if not names else f"logical axis names {names}"
            raise ValueError(f"parameter {where} of shape {list(shape)} has {what}; expected one "
                             "name per dimension (nnx.with_partitioning)")
        flat.append((path, names))
    return _nest(flat)


def _nest(flat) -> dict:
    out: dict = {}
    for path, value in flat:
        node = out
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return out


def logical_spec(names: tuple, shape: tuple[int, ...], mesh_shape: dict[str, int],
                 rules=LOGICAL_RULES) -> PartitionSpec:
    """The ``PartitionSpec`` of a parameter of ``shape`` with logical axis ``names`` on a mesh of
    ``mesh_shape`` (``{axis: size}``), by ``rules`` (see the module docstring). Mesh axes of
    size 1 are left out. Raises ``ValueError`` for a name without a rule, or a rule naming an
    axis the mesh does not have."""
    known = {name for name, _ in rules}
    spec, used = [], set()
    for name, size in zip(names, shape, strict=True):
        if name is not None and name not in known:
            raise ValueError(f"logical axis {name!r} has no sharding rule; rules: {rules}")
        chosen = None
        for rule_name, axis in rules:
            if rule_name != name or axis is None or axis in used:
                continue
            if axis not in mesh_shape:
                raise ValueError(f"sharding rule ({name!r}, {axis!r}): the mesh has no axis "
                                 f"{axis!r}; its axes are {tuple(mesh_shape)}")
            n = mesh_shape[axis]
            if n > 1 and size % n == 0:
                chosen = axis
                break
        if chosen is not None:
            used.add(chosen)
        spec.append(chosen)
    return PartitionSpec(*spec)


def tree_shardings(mesh: Mesh, tree: Any, axes: Any, rules=LOGICAL_RULES) -> Any:
    """A ``NamedSharding`` for every leaf of ``tree`` (arrays or ``ShapeDtypeStruct``): the
    parameters themselves, or a train state that holds parameter-shaped subtrees (optimizer
    moments, a float32 master copy). ``axes`` is :func:`logical_axes` of the model. A leaf whose
    key path ends with a parameter's path and which has that parameter's number of dimensions
    is laid out by :func:`logical_spec`; every other leaf (step counters, RNG keys) is
    replicated."""
    mesh_shape = dict(mesh.shape)
    by_path = {}
    for path, names in jax.tree_util.tree_flatten_with_path(
            axes, is_leaf=lambda x: isinstance(x, tuple))[0]:
        by_path[tuple(_key(p) for p in path)] = names
    depth = sorted({len(p) for p in by_path}, reverse=True)  # the longest match is the param

    def leaf(path, x):
        keys = tuple(_key(p) for p in path)
        shape = np.shape(x)
        for d in depth:
            names = by_path.get(keys[-d:]) if len(keys) >= d else None
            if names is not None and len(names) == len(shape):
                return NamedSharding(mesh, logical_spec(names, shape, mesh_shape, rules))
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree_util.tree_map_with_path(leaf, tree)


def _key(entry) -> Any:
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return getattr(entry, attr)
    return str(entry)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, BATCH_SPEC)


def check_batch_size(batch_size: int, mesh: Mesh, grad_accum: int = 1) -> None:
    n = mesh.shape["data"] * mesh.shape["fsdp"]
    if batch_size % (n * grad_accum):
        raise MeshError(
            f"--batch-size {batch_size} must be a multiple of the {n} batch shards of the mesh "
            f"(data x fsdp) times --grad-accum {grad_accum}"
        )


def process_rows(mesh: Mesh, batch_size: int) -> np.ndarray:
    """The global row indices of a ``batch_size``-row batch that this process's devices hold
    (sorted): the rows a process needs to read."""
    index = batch_sharding(mesh).addressable_devices_indices_map((batch_size,))
    rows = {r for idx in index.values() for r in range(*idx[0].indices(batch_size))}
    return np.array(sorted(rows), np.int64)


def shard_batch(batch: dict[str, np.ndarray], mesh: Mesh, rows: np.ndarray | None = None,
                batch_size: int | None = None) -> dict[str, jax.Array]:
    """Places a numpy batch onto the mesh, batch axis split over ``("data", "fsdp")``. With
    ``rows=None`` the arrays are the whole global batch (each process copies the rows its
    devices hold); else they hold only the global rows ``rows`` (:func:`process_rows`) of a
    ``batch_size``-row global batch."""
    sharding = batch_sharding(mesh)

    def put(x):
        x = np.asarray(x)
        if rows is None:
            return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])

        def local(idx):
            start, stop, _ = idx[0].indices(batch_size)
            at = int(np.searchsorted(rows, start))
            return x[(slice(at, at + stop - start), *idx[1:])]

        return jax.make_array_from_callback((batch_size, *x.shape[1:]), sharding, local)

    return {k: put(v) for k, v in batch.items()}


_COORD_VARS = ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS")


def maybe_initialize_distributed(env: dict[str, str] | None = None) -> bool:
    """Calls ``jax.distributed.initialize()`` when the environment describes a multi-process job,
    and returns whether it did:

    * ``JAX_COORDINATOR_ADDRESS`` or ``COORDINATOR_ADDRESS`` (host:port), with
      ``JAX_NUM_PROCESSES``/``NUM_PROCESSES`` and ``JAX_PROCESS_ID``/``PROCESS_ID``;
    * a SLURM job step with more than one task (``SLURM_NTASKS`` > 1), or an Open MPI job
      (``OMPI_COMM_WORLD_SIZE`` > 1): JAX reads the rest from the cluster environment.

    Otherwise (one process) nothing is initialised.
    """
    env = dict(os.environ if env is None else env)

    def first(*names):
        for n in names:
            if env.get(n):
                return env[n]
        return None

    coord = first(*_COORD_VARS)
    if coord:
        n = first("JAX_NUM_PROCESSES", "NUM_PROCESSES")
        pid = first("JAX_PROCESS_ID", "PROCESS_ID")
        jax.distributed.initialize(
            coordinator_address=coord,
            num_processes=None if n is None else int(n),
            process_id=None if pid is None else int(pid),
        )
        return True
    if int(env.get("SLURM_NTASKS", "1") or 1) > 1 or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
        jax.distributed.initialize()
        return True
    return False
