"""The Pallas path under a mesh runs per device (``jax.shard_map`` over the batch axes) and
computes the same values and gradients as without a mesh. Runs in a subprocess with 4 host CPU
devices (the device count is fixed when jax starts), Pallas in interpret mode."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(r"""
    import json, os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    import jax, jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P
    from flax import nnx
    from qdelta_jax import ops, qdelta_rule
    from qdelta_jax.layers import QDelta
    from qdelta_jax.testing import random_inputs, rel_err

    res = {}
    q, k, v, g, beta, lam = random_inputs(jax.random.PRNGKey(3), 4, 40, 2, 16, 32)[:6]
    h0 = 0.1 * jax.random.normal(jax.random.PRNGKey(4), (4, 2, 16, 32))
    auto = (jax.sharding.AxisType.Auto,) * 2
    mesh = jax.make_mesh((2, 2), ("data", "fsdp"), axis_types=auto)
    rows = NamedSharding(mesh, P(("data", "fsdp")))

    def loss(q, k, v, g, beta, lam, h0, batch_axes=ops.DEFAULT_BATCH_AXES):
        o, f = qdelta_rule(q, k, v, g, beta, lam, initial_state=h0, output_final_state=True,
                           chunk_size=16, implementation="pallas", batch_axes=batch_axes)
        return jnp.sum(o * o) + jnp.sum(f * h0), (o, f)

    vg = jax.value_and_grad(loss, argnums=tuple(range(7)), has_aux=True)
    args = (q, k, v, g, beta, lam, h0)
    ref = jax.jit(vg)(*args)
    res["plain_jaxpr_has_shard_map"] = "shard_map" in str(jax.make_jaxpr(vg)(*args))
    sharded = jax.device_put(args, rows)
    with jax.set_mesh(mesh):
        res["mesh_jaxpr_has_shard_map"] = "shard_map" in str(jax.make_jaxpr(vg)(*sharded))
        out = jax.jit(vg)(*sharded)
        # 3 rows do not split over 4 devices: the op runs unsplit, still correct.
        res["odd_batch_split"] = ops.batch_split(3) is not None
        # Other batch axes (absent from this mesh) or none: the op runs unsplit.
        for name, axes in (("dp", ("dp",)), ("none", ())):
            fn = jax.value_and_grad(lambda *a, x=axes: loss(*a, batch_axes=x),
                                    argnums=tuple(range(7)), has_aux=True)
            res[f"{name}_axes_shard_map"] = "shard_map" in str(jax.make_jaxpr(fn)(*sharded))
    res["errs"] = [rel_err(a, b) for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(ref))]
    res["grad_specs"] = [str(x.sharding.spec) for x in out[1]]

    # The layer's packed-documents path (vmapped rows) is split the same way.
    layer = QDelta(hidden_size=32, num_heads=2, head_dim=16, chunk_size=16,
                   implementation="pallas", rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.PRNGKey(5), (4, 40, 32))
    cu = jnp.array([[0, 10, 40], [0, 25, 40], [0, 40, 40], [0, 5, 40]], jnp.int32)
    y_ref = layer(x, cu_seqlens=cu)
    gd, st = nnx.split(layer)
    f = jax.jit(lambda st, x, cu: nnx.merge(gd, st)(x, cu_seqlens=cu))
    with jax.set_mesh(mesh):
        y = f(st, jax.device_put(x, rows), jax.device_put(cu, rows))
        res["layer_jaxpr_has_shard_map"] = "shard_map" in str(jax.make_jaxpr(
            lambda x, cu: nnx.merge(gd, st)(x, cu_seqlens=cu))(x, cu))
    res["layer_err"] = rel_err(y, y_ref)
    print("RESULT " + json.dumps(res))
""")


def test_pallas_op_is_split_over_the_batch_axes_of_the_mesh(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    p = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")][-1]
    res = json.loads(line[len("RESULT "):])
    assert not res["plain_jaxpr_has_shard_map"]
    assert res["mesh_jaxpr_has_shard_map"]
    assert res["layer_jaxpr_has_shard_map"]
    assert not res["odd_batch_split"]
    assert not res["dp_axes_shard_map"] and not res["none_axes_shard_map"]
    # float32, interpret mode: the split computes the same rows in the same order.
    assert max(res["errs"]) < 1e-5, res["errs"]
    assert res["layer_err"] < 1e-5
    assert all("data" in s and "fsdp" in s for s in res["grad_specs"]), res["grad_specs"]


def test_batch_axes_is_an_argument():
    import jax

    from qdelta_jax import ops, qdelta_rule
    from qdelta_jax.testing import random_inputs

    q, k, v, g, beta, lam, _ = random_inputs(jax.random.key(0), 1, 8, 1, 8, 8)
    with pytest.raises(TypeError, match="batch_axes"):
        qdelta_rule(q, k, v, g, beta, lam, implementation="xla", batch_axes="data")
    with pytest.raises(TypeError, match="batch_axes"):
        ops.batch_split(8, ("data", 1))
    assert ops.batch_split(8, ("dp",)) is None  # no mesh in context
