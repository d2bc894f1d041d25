"""Device mesh, sharding rules and multi-host start-up.

The mesh has two axes, ``("data", "fsdp")``, from ``--mesh data=4,fsdp=2`` (default: every device
on ``data``). The batch axis of every batch array is split over both axes, so each device sees
``B / (data * fsdp)`` rows. Parameters and optimizer state are sharded by a shape rule: the
largest dimension divisible by the ``fsdp`` size is split over ``"fsdp"``, everything else
(scalars, small or indivisible leaves) is replicated. XLA inserts the all-gathers and
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


def param_spec(shape: tuple[int, ...], fsdp: int) -> PartitionSpec:
    """Shards the largest dimension divisible by ``fsdp`` over ``"fsdp"``; else replicated."""
    if fsdp <= 1 or not shape:
        return PartitionSpec()
    order = sorted(range(len(shape)), key=lambda d: (-shape[d], d))
    for d in order:
        if shape[d] % fsdp == 0 and shape[d] >= fsdp:
            spec = [None] * len(shape)
            spec[d] = "fsdp"
            return PartitionSpec(*spec)
    return PartitionSpec()


def tree_shardings(mesh: Mesh, tree: Any) -> Any:
    """A ``NamedSharding`` for every leaf of ``tree`` (arrays or ``ShapeDtypeStruct``)."""
    fsdp = mesh.shape["fsdp"]
    return jax.tree.map(lambda x: NamedSharding(mesh, param_spec(np.shape(x), fsdp)), tree)


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
