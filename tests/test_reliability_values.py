"""Nothing silent: token ids are range-checked by the loaders (when a file is opened), by the
model (when tokens are concrete) and by ``generate``; ``--eos-id`` must occur in the data. A NaN
or inf given to the op spoils on every implementation exactly what it spoils in the scan."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qdelta_jax import qdelta_rule
from qdelta_jax.model import QDeltaConfig, QDeltaLM, generate
from qdelta_jax.testing import random_inputs, tolerance
from qdelta_jax.train import cli
from qdelta_jax.train import data as D


@pytest.fixture(scope="module")
def model():
    cfg = QDeltaConfig.from_preset("tiny", vocab_size=64, num_hidden_layers=1)
    return QDeltaLM(cfg, rngs=nnx.Rngs(0))


def tokens_file(tmp_path, ids, name="t.npy", dtype=np.int32):
    p = tmp_path / name
    ids = np.asarray(ids, dtype)
    if name.endswith(".npy"):
        np.save(p, ids)
    else:
        ids.tofile(p)
    return p


def test_negative_ids_in_npy_are_refused(tmp_path):
    p = tokens_file(tmp_path, [5, 7, -1, 3] * 50)
    with pytest.raises(D.DataError, match=r"must be >= 0, found -1 at position 2"):
        D.load_tokens(p)


def test_huge_id_in_u32_bin_is_refused(tmp_path):
    ids = np.arange(400) % 50
    ids[123] = 3_000_000_000
    p = tokens_file(tmp_path, ids, "t.u32.bin", np.uint32)
    with pytest.raises(D.DataError, match=r"3000000000 at position 123 .*dtype"):
        D.load_tokens(p)


def test_eos_id_must_occur_in_the_data(tmp_path):
    p = tokens_file(tmp_path, np.arange(400) % 50, "t.bin", np.uint16)
    with pytest.raises(D.DataError, match=r"--eos-id 60000 never occurs") as e:
        D.load_tokens(p, eos_id=60000)
    assert e.value.flag == "--eos-id"
    assert D.load_tokens(p, eos_id=49)[2] == 50, "an eos that occurs changes nothing"


def test_eos_id_with_text_is_refused(tmp_path):
    p = tmp_path / "a.txt"
    p.write_text("hello world " * 50)
    with pytest.raises(D.DataError, match="--eos-id applies to .bin/.npy"):
        D.load_tokens(p, eos_id=3)


def test_cli_reports_bad_token_file(tmp_path, capsys):
    p = tokens_file(tmp_path, [5, 7, -1, 3] * 50)
    assert cli.main(["--task", "text", "--data", str(p), "--steps", "1", "--no-progress",
                     "--run-dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "--data" in err and "must be >= 0" in err and "Traceback" not in err


@pytest.mark.parametrize("bad", [64, 1000, -1])
def test_model_refuses_ids_outside_the_vocabulary(model, bad):
    tokens = jnp.zeros((2, 8), jnp.int32).at[1, 5].set(bad)
    with pytest.raises(ValueError, match=rf"tokens must hold ids in \[0, vocab_size = 64\), got "
                                         rf"{bad} at index \[1, 5\]"):
        model(tokens)
    cache = model.init_cache(2)
    with pytest.raises(ValueError, match="tokens must hold ids"):
        model.step(tokens, cache)


def test_generate_refuses_bad_prompts(model):
    prompt = jnp.array([[1, 2, 99]], jnp.int32)
    with pytest.raises(ValueError, match=r"prompt must hold ids in \[0, vocab_size = 64\)"):
        generate(model, prompt, 2)


def test_good_ids_pass(model):
    assert model(jnp.full((1, 4), 63, jnp.int32)).shape == (1, 4, 64)


# ----------------------------------------------------------------------------- non-finite op inputs

ARGS = ("q", "k", "v", "g", "beta", "lam", "initial_state")
C = 16  # chunk; T = 40 puts tokens 16, 23, 31 at the start, middle and end of the second chunk
POSITIONS = (16, 23, 31)
LAYOUTS = {  # name: (B, cu_seqlens, states in and out)
    "unpacked": (1, None, True),
    "packed": (1, np.array([0, 13, 40], np.int32), True),  # per-document layout
    "packed-rows": (2, np.array([[0, 13, 40, 40], [0, 21, 22, 40]], np.int32), False),
}


def layout_inputs(layout, dtype=jnp.float32):
    B, cu, states = LAYOUTS[layout]
    N = B if cu is None else cu.size - (1 if cu.ndim == 1 else B)
    xs = random_inputs(jax.random.key(7), B, 40, 2, 8, 4, dtype=dtype, N=N)
    return list(xs), (None if cu is None else jnp.asarray(cu)), states


@partial(jax.jit, static_argnames=("impl", "states"))
def outputs_and_grads(impl, inputs, cu, states):
    """``(o, final, grads of the 7 inputs)`` of a loss over every output and final state."""

    def loss(*xs):
        h0 = xs[6] if states else None
        o, final = qdelta_rule(*xs[:6], initial_state=h0, output_final_state=states,
                               cu_seqlens=cu, chunk_size=C, implementation=impl,
                               guard_nonfinite=True)
        w = jnp.cos(jnp.arange(o.size, dtype=jnp.float32)).reshape(o.shape)
        total = jnp.sum(o.astype(jnp.float32) * w)
        if states:
            total = total + 0.5 * jnp.sum(final * jnp.sin(final))
        return total, (o, final)

    grads, (o, final) = jax.grad(loss, argnums=tuple(range(7)), has_aux=True)(*inputs)
    return o, final, grads


def spoil(inputs, arg, t, b=0):
    """``inputs`` with one element of ``arg`` at token ``t`` of row ``b`` set to NaN or +-inf
    (one element of a vector: the op normalises q, k over it, the scan spoils all of it)."""
    i = ARGS.index(arg)
    x = inputs[i]
    val = {"q": jnp.nan, "k": -jnp.inf, "v": jnp.inf, "g": jnp.nan, "beta": jnp.inf,
           "lam": jnp.nan}[arg]
    if arg == "g" and t % 2:
        val = jnp.inf  # g = +inf grows the state without bound: not finite either
    idx = (b, t, 1) + ((x.ndim - 3) * (1,))
    out = list(inputs)
    out[i] = x.at[idx].set(val)
    return out


def assert_like_reference(got, ref, tol, what):
    """Non-finite exactly where ``ref`` is; within ``tol`` (relative, over the finite part)
    elsewhere."""
    got = np.asarray(jnp.asarray(got, jnp.float32), np.float64)
    ref = np.asarray(jnp.asarray(ref, jnp.float32), np.float64)
    fin = np.isfinite(ref)
    wrong = np.argwhere(np.isfinite(got) != fin)
    assert wrong.size == 0, (f"{what}: non-finite pattern differs from the reference at "
                             f"{len(wrong)} elements, first {wrong[0].tolist()}")
    if fin.any():
        err = np.linalg.norm(got[fin] - ref[fin]) / max(np.linalg.norm(ref[fin]), 1e-30)
        assert err < tol, f"{what}: rel err {err:.2e} >= {tol:.2e}"


def check_case(impl, inputs, cu, states, what, dtype=jnp.float32):
    ref = outputs_and_grads("reference", inputs, cu, states)
    got = outputs_and_grads(impl, inputs, cu, states)
    tol = tolerance(dtype)
    assert_like_reference(got[0], ref[0], tol, f"{what}: o")
    assert not np.isfinite(np.asarray(ref[0], np.float32)).all(), f"{what}: nothing spoiled"
    if states:
        assert_like_reference(got[1], ref[1], tol, f"{what}: final state")
    for name, a, r in zip(ARGS, got[2], ref[2]):
        if states or name != "initial_state":
            assert_like_reference(a, r, 4 * tol, f"{what}: d{name}")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_non_finite_input_spoils_what_the_scan_spoils_xla(layout):
    """Each argument spoiled at the start, middle and end of a chunk: outputs, final states and
    gradients are non-finite exactly where the reference's are (earlier tokens, other documents
    and heads, other value columns stay finite) and equal it elsewhere."""
    inputs, cu, states = layout_inputs(layout)
    for arg in ARGS[:6]:
        for t in POSITIONS:
            check_case("xla", spoil(inputs, arg, t), cu, states, f"xla {layout} {arg}@{t}")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_non_finite_input_spoils_what_the_scan_spoils_pallas(layout):
    """The same for the Pallas kernels (interpret mode on the CPU), one position per argument."""
    inputs, cu, states = layout_inputs(layout)
    for i, arg in enumerate(ARGS[:6]):
        t = POSITIONS[i % 3]
        check_case("pallas", spoil(inputs, arg, t), cu, states, f"pallas {layout} {arg}@{t}")


def test_non_finite_inputs_in_bfloat16_and_a_reset():
    """bfloat16 inputs, two spoiled tokens of one document; a g = -inf reset between them is
    not a spoiled token (the reset is exact; what follows it is spoiled by the first token)."""
    inputs, cu, states = layout_inputs("unpacked", jnp.bfloat16)
    inputs[3] = inputs[3].at[0, 10, 1].set(-jnp.inf)
    check_case("xla", spoil(spoil(inputs, "v", 5), "beta", 30), cu, states, "bf16",
               jnp.bfloat16)


def test_the_spoiling_is_free_where_everything_is_finite():
    """All finite (a g = -inf reset included): no NaN anywhere, values as the reference's."""
    inputs, cu, states = layout_inputs("packed")
    inputs[3] = inputs[3].at[0, 20, 0].set(-jnp.inf)
    ref = outputs_and_grads("reference", inputs, cu, states)
    got = outputs_and_grads("xla", inputs, cu, states)
    for name, a, r in zip(("o", "final") + ARGS, got[:2] + tuple(got[2]),
                          ref[:2] + tuple(ref[2])):
        assert np.isfinite(np.asarray(a)).all(), name
        assert_like_reference(a, r, 4 * tolerance(jnp.float32), name)


def test_the_guard_can_be_switched_off():
    """``guard_nonfinite=False``: the same outputs for finite inputs; a NaN then reaches the
    earlier tokens of its chunk (what the guard prevents), so the switch does what it says."""
    inputs, _, _ = layout_inputs("unpacked")
    run = jax.jit(lambda xs, guard: qdelta_rule(*xs[:6], chunk_size=C, implementation="xla",
                                                guard_nonfinite=guard)[0],
                  static_argnames="guard")
    np.testing.assert_array_equal(np.asarray(run(inputs, guard=False)),
                                  np.asarray(run(inputs, guard=True)))
    bad = spoil(inputs, "v", 23)  # token 23 of the chunk 16..31
    assert np.isfinite(np.asarray(run(bad, guard=True))[0, 16:23]).all()
    assert not np.isfinite(np.asarray(run(bad, guard=False))[0, 16:23]).all()


def test_the_guard_runs_the_plain_call_where_everything_is_finite():
    """Finite inputs: outputs, final states and every gradient bit for bit those of the
    unguarded call (the guard's masks are built only in the branch for spoiled outputs); under
    ``vmap`` (where its ``cond`` becomes a select) the values stay those of the plain call."""
    inputs, cu, states = layout_inputs("packed")

    def loss(guard, *xs):
        o, final = qdelta_rule(*xs[:6], initial_state=xs[6], output_final_state=True,
                               cu_seqlens=cu, chunk_size=C, implementation="xla",
                               guard_nonfinite=guard)
        return jnp.sum(o * jnp.cos(o)) + jnp.sum(final ** 2), (o, final)

    grad = jax.jit(jax.grad(loss, argnums=tuple(range(1, 8)), has_aux=True),
                   static_argnums=0)
    (g1, (o1, f1)), (g0, (o0, f0)) = grad(True, *inputs), grad(False, *inputs)
    for a, b in zip((o1, f1) + g1, (o0, f0) + g0):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    one = lambda *xs: qdelta_rule(*xs, chunk_size=C, implementation="xla",  # noqa: E731
                                  guard_nonfinite=True)[0]
    batched = jax.vmap(one)(*[x[None] for x in inputs[:6]])
    np.testing.assert_allclose(np.asarray(batched[0]), np.asarray(one(*inputs[:6])),
                               rtol=1e-6, atol=1e-6)
