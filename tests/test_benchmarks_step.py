"""The training-step benchmarks on the CPU at tiny sizes: ``benchmarks/profile_step.py`` (its
HLO reading and categories, and a real profile of the tiny preset's step, with and without the
stand-in op), ``benchmarks/crossover.py`` (the run plan, a smoke run) and the transformer of
``benchmarks/llama.py``."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

BENCH = Path(__file__).parents[1] / "benchmarks"

pytestmark = pytest.mark.usefixtures("xla_cache")


def load(name: str):
    """A benchmark script as a module (they import their sibling modules by name)."""
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    return importlib.import_module(name)


HLO = """HloModule jit_train_step, entry_computation_layout={()}

%fused_dot (p0: bf16[4,8], p1: bf16[8,16]) -> f32[4,16] {
  %p0 = bf16[4,8]{1,0} parameter(0)
  %p1 = bf16[8,16]{1,0} parameter(1)
  ROOT %dot.1 = f32[4,16] dot(%p0, %p1), metadata={op_name="jit(s)/jvp(mlp)/linear/dot_general"}
}

%body (p: (s32[], f32[4])) -> (s32[], f32[4]) {
  %p = (s32[], f32[4]{0}) parameter(0)
  ROOT %dynamic-update-slice_fusion.3 = f32[4]{0} fusion(%p), kind=kLoop, calls=%fused_dus
}

ENTRY %main (a: bf16[4,8], b: bf16[8,16]) -> f32[4,16] {
  %a = bf16[4,8]{1,0} parameter(0)
  %gemm_fusion.2 = f32[4,16]{1,0} fusion(%a, %b), kind=kCustom, calls=%fused_dot
  %while.7 = (s32[], f32[4]) while(%t), body=%body, metadata={op_name="jit(s)/qdelta_op/while"}
  %copy.4 = f32[4,16]{0,1} copy(%gemm_fusion.2), metadata={op_name="jit(s)/norm/copy"}
  %mul.5 = f32[4,16] multiply(%x, %y), metadata={op_name="jit(s)/transpose(jvp(short_conv))/mul"}
  %add.6 = f32[4,16]{1,0} add(%x, %y), metadata={op_name="jit(s)/optimizer/add"}
  %mul.8 = f32[4,16]{1,0} multiply(%x, %y), metadata={op_name="jit(s)/jvp(lm_head_loss)/mul"}
  ROOT %sub.9 = f32[4,16]{1,0} subtract(%x, %y), metadata={op_name="jit(s)/jvp(gates)/sub"}
}
"""


def test_hlo_instructions_map_to_categories():
    ps = load("profile_step")
    instrs, module = ps.parse_hlo(HLO)
    assert module == "jit_train_step"
    assert instrs["gemm_fusion.2"]["dot"] and instrs["while.7"]["opcode"] == "while"
    # A scan's loop body carries no metadata: it takes the loop's name stack.
    assert "qdelta_op" in instrs["dynamic-update-slice_fusion.3"]["op_name"]
    cat = {name: ps.categorize(name, info) for name, info in instrs.items()}
    assert cat["gemm_fusion.2"] == "projection and MLP matmuls"
    assert cat["dynamic-update-slice_fusion.3"] == "Q-Delta op, XLA"
    assert cat["copy.4"] == "copies/transposes"
    assert cat["mul.5"] == "short conv"
    assert cat["add.6"] == "optimizer update"
    assert cat["mul.8"] == "LM head + cross-entropy"
    assert cat["sub.9"] == "norms, gates, activations"
    assert ps.categorize("qdelta_chunk_solve", None) == "Q-Delta kernels"
    assert ps.categorize("MemcpyD2D", None) == "copies/transposes"
    assert ps.categorize("void some_kernel<8>", None) == "rest"
    # Events of the module, control flow left out (its body's events count instead).
    events = [("k", "gemm_fusion.2", "jit_train_step", 2e-3), ("w", "while.7", "jit_train_step",
              5e-3), ("d", "dynamic-update-slice_fusion.3", "jit_train_step", 1e-3),
              ("x", "add.6", "jit_other", 9.0)]
    per_cat, calls, top, unmapped = ps.summarize(events, instrs, module, n_steps=2)
    assert per_cat["projection and MLP matmuls"] == pytest.approx(1e-3)
    assert per_cat["Q-Delta op, XLA"] == pytest.approx(5e-4)
    assert calls["Q-Delta op, XLA"] == 0.5 and calls["optimizer update"] == 0
    assert sum(per_cat.values()) == pytest.approx(1.5e-3) and unmapped == 0
    assert top[0][0] == "gemm_fusion.2"


def test_profile_step_tiny_and_stand_in(tmp_path, capsys):
    """A real profile of the tiny preset's training step on the CPU: the table has every
    category, device time > 0 in the parts the step has, and the stand-in op is a small part of
    the op (counted in kernels: their times on a shared CPU are noisy)."""
    ps = load("profile_step")
    common = ["--preset", "tiny", "--batch", "2", "--seq-len", "128", "--steps", "1",
              "--profile-steps", "1"]
    r = ps.main(common + ["--json", str(tmp_path / "p.json"), "--trace-dir",
                          str(tmp_path / "trace")])
    out = capsys.readouterr().out
    for cat in ps.CATEGORIES:
        assert f"| {cat} | " in out
    assert r["step_s"] > 0 and r["tokens_per_s"] > 0 and r["device_s_per_step"] > 0
    cats = r["categories_s"]
    for cat in ("Q-Delta op, XLA", "LM head + cross-entropy", "optimizer update",
                "projection and MLP matmuls"):
        assert cats[cat] > 0, (cat, cats)
    assert np.isfinite(r["loss"]) and r["top_kernels"]
    assert json.loads((tmp_path / "p.json").read_text())["categories_s"] == cats

    t = ps.main(common[:-1] + ["0"])  # --profile-steps 0: the step timed, nothing profiled
    assert t["step_s"] > 0 and "categories_s" not in t and np.isfinite(t["loss"])
    assert "tokens/s" in capsys.readouterr().out.splitlines()[-1]

    s = ps.main(common + ["--stand-in"])
    assert s["stand_in"] and s["categories_s"]["LM head + cross-entropy"] > 0
    op, stand_in = r["categories_calls"]["Q-Delta op, XLA"], s["categories_calls"][
        "Q-Delta op, XLA"]
    assert 0 < stand_in < 0.2 * op, (stand_in, op)


def test_crossover_plan_and_smoke_run(tmp_path, capsys):
    xo = load("crossover")
    a = xo.parse_args(["--seq-lens", "4096", "2048", "--tokens-per-step", "8192",
                       "--long-seq-lens", "4096", "8192", "--long-batches", "2", "1"])
    assert xo.plan(a) == [("qdelta", 2048, 4), ("llama", 2048, 4), ("qdelta", 4096, 2),
                          ("llama", 4096, 2), ("qdelta", 4096, 1), ("qdelta", 8192, 1),
                          ("qdelta", 8192, 2)]  # (qdelta, 4096, 2) is not run twice
    with pytest.raises(SystemExit):
        xo.parse_args(["--attention", "flash"])

    png = tmp_path / "x.png"
    rows = xo.main(["--preset", "tiny", "--seq-lens", "32", "--tokens-per-step", "64",
                    "--no-long", "--steps", "1", "--warmup", "0", "--out", str(png),
                    "--model-overrides", "num_hidden_layers=1",
                    "--json", str(tmp_path / "x.json")])
    out = capsys.readouterr().out
    assert [(r["model"], r["seq_len"], r["batch"]) for r in rows] == [("qdelta", 32, 2),
                                                                      ("llama", 32, 2)]
    assert all(r["status"] == "ok" and r["tokens_per_s"] > 0 and np.isfinite(r["loss"])
               for r in rows)
    assert "| qdelta | 32 | 2 | 64 |" in out and "| llama | 32 | 2 | 64 |" in out
    assert png.stat().st_size > 0
    assert len(json.loads((tmp_path / "x.json").read_text())["rows"]) == 2


def test_crossover_runs_a_point_that_runs_out_of_memory_again_with_remat(monkeypatch, capsys):
    xo = load("crossover")
    calls = []

    def fake_point(name, fns, vocab, T, B, a):
        calls.append(fns)
        ok = len(calls) > 1
        return {"model": name, "seq_len": T, "batch": B, "tokens_per_step": B * T,
                "status": "ok" if ok else "out of memory", "step_s": 1.0,
                "tokens_per_s": float(B * T), "compile_s": 0.0, "memory": {}}

    monkeypatch.setattr(xo, "run_point", fake_point)
    rows = xo.main(["--preset", "tiny", "--models", "qdelta", "--seq-lens", "32",
                    "--tokens-per-step", "32", "--no-long", "--out", ""])
    assert len(calls) == 2 and calls[0] is not calls[1]  # the second with the remat model
    assert rows[0]["status"] == "ok" and rows[0]["remat"]
    assert "| qdelta (remat) | 32 | 1 | 32 |" in capsys.readouterr().out


@pytest.mark.parametrize("scan_layers", [True, False])
def test_llama_is_causal_and_its_loss_is_the_loss_of_its_logits(scan_layers):
    llama = load("llama")
    cfg = llama.LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_heads=2,
                            head_dim=16, intermediate_size=64, compute_dtype="float32",
                            scan_layers=scan_layers)
    m = llama.LlamaLM(cfg, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, 64, (2, 12)), jnp.int32)
    targets = jnp.asarray(rng.integers(0, 64, (2, 12)), jnp.int32)
    mask = jnp.ones((2, 12), jnp.float32)
    logits = m(tokens)
    changed = m(tokens.at[:, 8].set((tokens[:, 8] + 1) % 64))
    np.testing.assert_array_equal(np.asarray(changed[:, :8]), np.asarray(logits[:, :8]))
    assert not np.allclose(np.asarray(changed[:, 8:]), np.asarray(logits[:, 8:]))
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    np.testing.assert_allclose(float(m.loss(tokens, targets, mask, chunk_tokens=10)),
                               float(jnp.sum(lse - picked)), rtol=1e-5)
    with pytest.raises(ValueError, match="cu_seqlens"):
        m(tokens, cu_seqlens=jnp.array([[0, 6, 12], [0, 12, 12]]))


def test_ops_implementation_names():
    """``benchmarks/ops.py --impl``: an implementation, optionally with kernel config suffixes
    (the Mosaic V tile, the Mosaic state-side gradients); anything else is refused by name."""
    from qdelta_jax.pallas import Config

    ops = load("ops")
    assert ops.split_impl("pallas") == ("pallas", None)
    assert ops.split_impl("pallas-no-save-residuals") == ("pallas", Config(save_residuals=False))
    assert ops.split_impl("pallas+mbv32") == ("pallas", Config(mosaic_block_v=32))
    assert ops.split_impl("pallas-mosaic+tdqkw+mbv64") == (
        "pallas-mosaic", Config(mosaic_dqkw=False, mosaic_block_v=64))
    assert ops.split_impl("pallas-mosaic+tdd0") == ("pallas-mosaic",
                                                    Config(mosaic_fused_dd0=False))
    assert ops.split_impl("pallas-mosaic+tgk") == ("pallas-mosaic", Config(mosaic_grads_k=False))
    assert ops.split_impl("pallas-mosaic+nfl") == ("pallas-mosaic",
                                                   Config(mosaic_fused_local=False))
    assert ops.split_impl("pallas-mosaic+pfl") == ("pallas-mosaic",
                                                   Config(mosaic_fused_local=True))
    assert ops.split_impl("pallas-mosaic+ms1") == ("pallas-mosaic", Config(mosaic_steps=1))
    with pytest.raises(ValueError, match="mosaic_steps"):
        ops.split_impl("pallas-mosaic+ms5")
    with pytest.raises(ValueError, match=r"unknown suffix \+fast"):
        ops.split_impl("pallas+fast")
    with pytest.raises(ValueError, match="mosaic_block_v"):
        ops.split_impl("pallas+mbv48")
    # qdelta-check takes the same names and refuses unknown suffixes by name.
    from qdelta_jax import check

    assert check._variant("pallas-mosaic+tdd0") == {
        "implementation": "pallas-mosaic", "config": Config(mosaic_fused_dd0=False)}
    assert check._variant("xla") == {"implementation": "xla"}
    with pytest.raises(SystemExit):
        check.main(["--small", "--implementations", "xla,pallas+fast"])


def test_authors_step_config_and_errors(tmp_path, capsys):
    """``benchmarks/authors_step.py`` (the authors' PyTorch model, GPU only): the config it builds
    their model from is our preset's, through the converter's mapping; a missing repository and
    bad sizes are refused by name."""
    from qdelta_jax.model import QDeltaConfig

    step = load("authors_step")
    ours = QDeltaConfig.from_preset("340m")
    cfg = step.authors_config("340m")
    assert (cfg["hidden_size"], cfg["num_heads"], cfg["head_dim"], cfg["num_hidden_layers"],
            cfg["vocab_size"]) == (ours.hidden_size, ours.num_heads, ours.head_dim,
                                   ours.num_hidden_layers, ours.vocab_size)
    assert cfg["head_dim"] * cfg["expand_v"] == ours.head_v_dim
    assert step.authors_config("340m", vocab_size=512)["vocab_size"] == 512
    assert step.main(["--print-config", "--preset", "tiny"]) == step.authors_config("tiny")
    assert json.loads(capsys.readouterr().out)["model_type"] == "qdelta"
    with pytest.raises(FileNotFoundError, match="no qdelta/ under"):
        step.load_model_class(str(tmp_path))
    with pytest.raises(SystemExit):
        step.parse_args(["--seq-len", "0"])
    assert "--seq-len must be >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="--preset nope"):
        step.main(["--preset", "nope", "--print-config"])


def test_compile_time_tiny(tmp_path, capsys):
    """benchmarks/compile_time.py at the tiny preset: a row per (implementation, depth, mode)
    with lower and compile times, the custom-call counts of the lowered module, the JSON."""
    ct = load("compile_time")
    out = tmp_path / "ct.json"
    assert ct.main(["--preset", "tiny", "--batch", "2", "--seq-len", "64", "--impl", "xla",
                    "--layers", "1", "--scan", "both", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [(r["layers"], r["scan_layers"]) for r in rows] == [(1, False), (1, True)]
    assert all(r["lower_s"] > 0 and r["compile_s"] > 0 and r["mosaic_hashes"] == 0
               for r in rows)
    assert "xla     scan layers   1" in capsys.readouterr().out
    calls = ct.custom_calls('x = stablehlo.custom_call @mosaic_gpu_v2(%a) {backend_config = '
                            '{kernel_hash = "\\01\\02", module = "m"}}\n'
                            'y = stablehlo.custom_call @mosaic_gpu_v2(%b) {backend_config = '
                            '{kernel_hash = "\\01\\02", module = "m"}}')
    assert calls["targets"] == {"mosaic_gpu_v2": 2} and calls["mosaic_hashes"] == 1
    with pytest.raises(SystemExit):
        ct.parse_args(["--layers", "0"])
