"""Recall experiments at small scale: Q-Delta against its reductions on MQAR and needle retrieval.

Four variants of the same model (same size, steps, data and seeds; docs/MATH.md sections 1 and 5):

* ``qdelta``    -- Q-Delta, learned ``lam = sigmoid(W_lam x - 0.9)``;
* ``gdn``       -- ``lam`` fixed at 0: exactly Gated DeltaNet;
* ``lam0.5``    -- ``lam`` fixed at 0.5 (the paper's fixed-lam ablation);
* ``deltanet``  -- ``lam = 0`` and no decay gate (``a = 1``): DeltaNet.

(``qdelta-neg``, Q-Delta with ``allow_neg_eigval``, can be added with ``--variants``.)

Tasks (docs/MATH.md section 6, data from :mod:`qdelta_jax.train.data`):

* ``mqar`` -- one model per variant and seed is trained on a mixture of (sequence length T,
  key-value pairs P) settings, as Zoology does; every batch holds the same number of rows of each
  setting, each row padded at its end to the longest T (padding is masked and, the model being
  causal, cannot affect the real tokens). Recall accuracy = token accuracy on the queried values,
  reported per setting on held-out rows.
* ``niah`` -- single needle, pass-key variant (5-digit number in repeated filler, byte tokens),
  trained at a random needle depth; exact match of the answer at fixed depths on held-out rows.

Efficiency (it has to fit about five minutes of one GPU, compilation included):

* the seeds of a variant train together: parameters and optimizer states are stacked on a leading
  seed axis and every step is ``jax.vmap``-ed over it;
* one jitted call runs ``--chunk-steps`` optimizer steps in a ``lax.scan``; shapes are fixed, so
  each (variant, task) has exactly three programs (init, train chunk, eval), all lowered first and
  compiled in parallel threads ahead of time;
* the total number of steps is set by ``--budget-minutes``: after the first rounds (which run in
  the warm-up, whose learning rates do not depend on the total) the measured time per round fixes
  how many rounds fit; the cosine schedule takes the total as a runtime input, so nothing
  recompiles. A hard deadline stops training early (and says so) if the device slows down later.
* the training data of a round is generated on the host in a background thread while the device
  trains the previous round; every variant sees the same batches.

Outputs: ``OUT/recall.json`` (per run: variant, task, setting, seed, final recall accuracy, loss
curve, wall time; plus the stability diagnostic of every trained variant) and, in ``--docs``
(default ``docs/``), ``RESULTS.md`` and the PNG plots. ``--from-json OUT/recall.json``
re-renders the docs from a saved result without training.

Usage::

    python experiments/recall.py --budget-minutes 5 --device-note "H100 80GB"   # the GPU run
    python experiments/recall.py --quick --out out/recall-quick              # CPU, 1-2 minutes
    python experiments/recall.py --smoke --out /tmp/r --docs /tmp/r          # seconds: the test
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.util
import json
import math
import platform
import queue
import shlex
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _bootstrap_package() -> None:
    """Makes ``qdelta_jax`` (and its ``train`` / ``pallas`` subpackages, which live in top-level
    folders mapped by ``pyproject.toml``) importable from a plain checkout, as on a machine where
    the package is not installed."""
    try:
        import qdelta_jax.train  # noqa: F401

        return
    except ImportError:
        pass
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    import qdelta_jax

    for sub in ("train", "pallas"):
        name = f"qdelta_jax.{sub}"
        if name in sys.modules or not (ROOT / sub / "__init__.py").exists():
            continue
        spec = importlib.util.spec_from_file_location(
            name, ROOT / sub / "__init__.py", submodule_search_locations=[str(ROOT / sub)]
        )
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
        setattr(qdelta_jax, sub, mod)


# The chunked "xla" path on every backend. (Until the chunk solve stopped calling jaxlib 0.10's
# LAPACK trsm on the CPU, see qdelta_jax.xla.unit_lower_inverse, the vmapped train chunk hung
# there on its second execution, and CPUs used the slower lax.scan reference instead; the quick
# profile now runs about 1.9x faster.)
DEFAULT_IMPLEMENTATION = "xla"

# ----------------------------------------------------------------------------- configuration

VARIANTS: dict[str, dict[str, Any]] = {
    "qdelta": dict(label="Q-Delta (learned lam)", fixed_lam=None, use_decay=True),
    "gdn": dict(label="Gated DeltaNet (lam = 0)", fixed_lam=0.0, use_decay=True),
    "lam0.5": dict(label="fixed lam = 0.5", fixed_lam=0.5, use_decay=True),
    "deltanet": dict(label="DeltaNet (lam = 0, no decay)", fixed_lam=0.0, use_decay=False),
    "qdelta-neg": dict(label="Q-Delta, allow_neg_eigval", fixed_lam=None, use_decay=True,
                       allow_neg_eigval=True),
}
DEFAULT_VARIANTS = ("qdelta", "gdn", "lam0.5", "deltanet")
COLORS = {"qdelta": "C3", "gdn": "C0", "lam0.5": "C2", "deltanet": "C7", "qdelta-neg": "C1"}


@dataclasses.dataclass(frozen=True)
class Profile:
    """Everything that sizes a run. ``rows`` are per seed."""

    name: str
    # model
    hidden_size: int
    num_layers: int
    num_heads: int
    head_dim: int
    chunk_size: int
    # mqar: (T, P) settings, vocabulary, training rows per setting, eval rows per setting
    mqar_settings: tuple[tuple[int, int], ...]
    mqar_vocab: int
    mqar_rows: int
    mqar_eval_rows: int
    # niah (pass-key): length, training rows, eval depths and rows per depth
    niah_len: int
    niah_rows: int
    niah_depths: tuple[float, ...]
    niah_eval_rows: int
    # training
    seeds: tuple[int, ...]
    lr: float
    warmup: int
    weight_decay: float
    chunk_steps: int
    min_steps: int
    max_steps: int
    calib_rounds: int
    budget_minutes: float
    tasks: tuple[str, ...] = ("mqar", "niah")
    variants: tuple[str, ...] = DEFAULT_VARIANTS


PROFILES: dict[str, Profile] = {
    # The GPU run: about 5 minutes of one H100/H200, compilation included.
    "full": Profile(
        name="full", hidden_size=128, num_layers=2, num_heads=2, head_dim=64, chunk_size=64,
        mqar_settings=((64, 8), (64, 16), (128, 8), (128, 16), (128, 32), (256, 8), (256, 16),
                       (256, 32)),
        mqar_vocab=256, mqar_rows=16, mqar_eval_rows=64,
        niah_len=512, niah_rows=32, niah_depths=(0.1, 0.3, 0.5, 0.7, 0.9), niah_eval_rows=64,
        seeds=(0, 1, 2), lr=3e-3, warmup=100, weight_decay=0.1, chunk_steps=50,
        min_steps=300, max_steps=4000, calib_rounds=2, budget_minutes=5.0,
    ),
    # A first look on a CPU (about two minutes on two cores, most of it compilation): MQAR only
    # (add niah with --tasks mqar,niah: its byte sequences are long for a CPU).
    "quick": Profile(
        name="quick", hidden_size=64, num_layers=2, num_heads=2, head_dim=32, chunk_size=16,
        mqar_settings=((16, 2), (32, 4), (32, 8)),
        mqar_vocab=64, mqar_rows=8, mqar_eval_rows=32,
        niah_len=176, niah_rows=4, niah_depths=(0.1, 0.5, 0.9), niah_eval_rows=8,
        seeds=(0, 1, 2), lr=1e-2, warmup=20, weight_decay=0.1, chunk_steps=10,
        min_steps=20, max_steps=400, calib_rounds=1, budget_minutes=2.0, tasks=("mqar",),
    ),
    # The end-to-end test: two variants, one small setting, a few steps.
    "smoke": Profile(
        name="smoke", hidden_size=32, num_layers=1, num_heads=2, head_dim=16, chunk_size=16,
        mqar_settings=((16, 2), (32, 4)), mqar_vocab=32, mqar_rows=4, mqar_eval_rows=4,
        niah_len=176, niah_rows=2, niah_depths=(0.5,), niah_eval_rows=2,
        seeds=(0, 1), lr=1e-2, warmup=4, weight_decay=0.1, chunk_steps=4,
        min_steps=8, max_steps=8, calib_rounds=1, budget_minutes=2.0,
        tasks=("mqar",), variants=("qdelta", "gdn"),
    ),
}


def _round_up(n: int, m: int) -> int:
    return m * ((n + m - 1) // m)


def model_config(prof: Profile, variant: str, vocab: int, implementation: str | None):
    from qdelta_jax.model import QDeltaConfig

    v = VARIANTS[variant]
    return QDeltaConfig(
        vocab_size=_round_up(vocab, 64), hidden_size=prof.hidden_size,
        num_hidden_layers=prof.num_layers, num_heads=prof.num_heads, head_dim=prof.head_dim,
        chunk_size=prof.chunk_size, implementation=implementation, fixed_lam=v["fixed_lam"],
        use_decay=v["use_decay"], allow_neg_eigval=v.get("allow_neg_eigval", False),
    )


# ----------------------------------------------------------------------------- tasks


class MQARTask:
    """A mixture of MQAR settings in one fixed ``[B, T_max]`` shape (rows padded at the end)."""

    name = "mqar"

    def __init__(self, prof: Profile):
        self.settings = list(prof.mqar_settings)
        self.vocab = prof.mqar_vocab
        self.rows = prof.mqar_rows
        self.eval_rows = prof.mqar_eval_rows
        self.T = max(T for T, _ in self.settings)
        self.B = self.rows * len(self.settings)
        self.B_eval = self.eval_rows * len(self.settings)
        self.row_setting = np.repeat(np.arange(len(self.settings)), self.rows)
        self.eval_row_setting = np.repeat(np.arange(len(self.settings)), self.eval_rows)

    def setting(self, j: int) -> dict[str, Any]:
        T, P = self.settings[j]
        return {"seq_len": T, "num_pairs": P}

    def _source(self, j: int, seed: int, rows: int, stream: int):
        from qdelta_jax.train.data import MQAR

        T, P = self.settings[j]
        # A separate data seed per setting: settings drawn from one stream would share keys.
        return MQAR(rows, T, P, self.vocab, seed=1000 * seed + j, stream=stream)

    def _pad(self, parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        out = {}
        for key in ("inputs", "targets", "mask"):
            arrs = []
            for p in parts:
                a = p[key]
                arrs.append(np.pad(a, ((0, 0), (0, self.T - a.shape[1]))))
            out[key] = np.concatenate(arrs, axis=0)
        valid = [np.pad(np.ones(p["inputs"].shape, bool),
                        ((0, 0), (0, self.T - p["inputs"].shape[1]))) for p in parts]
        out["valid"] = np.concatenate(valid, axis=0)
        return out

    def train_batch(self, seed: int, index: int) -> dict[str, np.ndarray]:
        from qdelta_jax.train.data import TRAIN_STREAM

        return self._pad([self._source(j, seed, self.rows, TRAIN_STREAM).batch(index)
                          for j in range(len(self.settings))])

    def eval_batch(self, seed: int) -> dict[str, np.ndarray]:
        from qdelta_jax.train.data import EVAL_STREAM

        return self._pad([self._source(j, seed, self.eval_rows, EVAL_STREAM).batch(0)
                          for j in range(len(self.settings))])

    @property
    def n_settings(self) -> int:
        return len(self.settings)


class NIAHTask:
    """Pass-key retrieval on bytes; training at random depths, evaluation at fixed depths."""

    name = "niah"
    vocab = 256

    def __init__(self, prof: Profile):
        self.T = prof.niah_len
        self.depths = list(prof.niah_depths)
        self.B = prof.niah_rows
        self.eval_rows = prof.niah_eval_rows
        self.B_eval = self.eval_rows * len(self.depths)
        self.row_setting = np.zeros(self.B, int)
        self.eval_row_setting = np.repeat(np.arange(len(self.depths)), self.eval_rows)

    def setting(self, j: int) -> dict[str, Any]:
        return {"seq_len": self.T, "depth": self.depths[j]}

    def train_batch(self, seed: int, index: int) -> dict[str, np.ndarray]:
        from qdelta_jax.train.data import NIAH, TRAIN_STREAM

        b = NIAH(self.B, self.T, "passkey", None, seed=seed, stream=TRAIN_STREAM).batch(index)
        return {**b, "valid": np.ones(b["inputs"].shape, bool)}

    def eval_batch(self, seed: int) -> dict[str, np.ndarray]:
        from qdelta_jax.train.data import EVAL_STREAM, NIAH

        parts = [NIAH(self.eval_rows, self.T, "passkey", d, seed=seed, stream=EVAL_STREAM).batch(0)
                 for d in self.depths]
        out = {k: np.concatenate([p[k] for p in parts]) for k in ("inputs", "targets", "mask")}
        out["valid"] = np.ones(out["inputs"].shape, bool)
        return out

    @property
    def n_settings(self) -> int:
        return len(self.depths)


TASK_CLASSES = {"mqar": MQARTask, "niah": NIAHTask}


def stack_rounds(task, seeds, start: int, n: int) -> dict[str, np.ndarray]:
    """Training batches of steps ``start .. start + n - 1`` for every seed: ``[S, n, B, T]``."""
    per_seed = []
    for s in seeds:
        steps = [task.train_batch(s, start + i) for i in range(n)]
        per_seed.append({k: np.stack([b[k] for b in steps]) for k in ("inputs", "targets",
                                                                          "mask")})
    return {k: np.stack([p[k] for p in per_seed]) for k in per_seed[0]}


# ----------------------------------------------------------------------------- programs


class Programs:
    """The three compiled programs of one (variant, task): init, train chunk, eval.

    Parameters and optimizer states carry a leading seed axis S. The train chunk maps
    ``(params, opt_state, batches [S, n, B, T], step0, total_steps)`` to the new states and the
    per-step, per-row masked loss sums ``[S, n, B]``.
    """

    def __init__(self, cfg, task, prof: Profile, n_seeds: int):
        import jax
        import jax.numpy as jnp
        import optax
        from flax import nnx

        from qdelta_jax import diagnostics
        from qdelta_jax.model import QDeltaLM, weight_decay_mask
        from qdelta_jax.train import loop

        self.cfg, self.task, self.prof = cfg, task, prof
        abstract = nnx.eval_shape(lambda: QDeltaLM(cfg, rngs=nnx.Rngs(0)))
        graphdef, abs_params = nnx.split(abstract)
        self.n_params = int(sum(math.prod(x.shape) for x in jax.tree.leaves(abs_params)))
        ocfg = loop.OptimConfig()  # the project's AdamW recipe: b1, b2, eps, clip
        tx = optax.chain(
            optax.clip_by_global_norm(ocfg.clip),
            optax.scale_by_adam(b1=ocfg.b1, b2=ocfg.b2, eps=ocfg.eps),
            optax.add_decayed_weights(prof.weight_decay, mask=weight_decay_mask),
        )
        lr, warmup, lo = prof.lr, max(prof.warmup, 1), 0.1 * prof.lr

        def lr_at(step, total):
            # Linear warm-up, then cosine to 0.1x at the last step; ``total`` is traced, so the
            # budget can fix it after the first rounds without a recompile.
            step = step.astype(jnp.float32)
            warm = lr * jnp.minimum(step + 1.0, warmup) / warmup
            t = jnp.clip((step - warmup) / jnp.maximum(total - warmup - 1.0, 1.0), 0.0, 1.0)
            return jnp.where(step < warmup, warm,
                             lo + 0.5 * (lr - lo) * (1.0 + jnp.cos(jnp.pi * t)))

        def init_one(key):
            params = nnx.split(QDeltaLM(cfg, rngs=nnx.Rngs(params=key)))[1]
            return params, tx.init(params)

        def row_stats(params, inputs, targets, mask, aux=False):
            out = nnx.merge(graphdef, params)(inputs, return_aux=aux)
            logits, extra = (out if aux else (out, None))
            logits = logits.astype(jnp.float32)
            lse = jax.nn.logsumexp(logits, axis=-1)
            picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
            nll = (lse - picked) * mask
            correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32) * mask
            return nll, correct, extra

        def loss_fn(params, b):
            nll, _, _ = row_stats(params, b["inputs"], b["targets"], b["mask"])
            row = jnp.sum(nll, axis=-1)
            return jnp.sum(row) / jnp.maximum(jnp.sum(b["mask"]), 1.0), row

        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

        def chunk_one(params, opt_state, batches, step0, total):
            def body(carry, b):
                params, opt_state, step = carry
                (loss, row), grads = grad_fn(params, b)
                updates, opt_state = tx.update(grads, opt_state, params)
                rate = lr_at(step, total)
                params = jax.tree.map(lambda p, u: p - rate * u, params, updates)
                return (params, opt_state, step + 1), (loss, row)

            (params, opt_state, _), (loss, rows) = jax.lax.scan(
                body, (params, opt_state, step0), batches)
            return params, opt_state, loss, rows

        def eval_one(params, inputs, targets, mask):
            nll, correct, aux = row_stats(params, inputs, targets, mask, aux=True)
            bc = jnp.stack(diagnostics.beta_c_from_aux(aux))  # [L, B, T, H]
            lam = jnp.stack([a["lam"] for a in aux])  # [L, B, T, H]
            return jnp.sum(nll, -1), jnp.sum(correct, -1), bc, lam

        S = n_seeds
        keys = jax.ShapeDtypeStruct((S,), jax.random.key(0).dtype)
        self._init = jax.jit(jax.vmap(init_one))
        state_abs = jax.eval_shape(self._init, keys)
        i32 = jax.ShapeDtypeStruct((), jnp.int32)
        f32 = jax.ShapeDtypeStruct((), jnp.float32)
        n, B, T = prof.chunk_steps, task.B, task.T

        def arr(shape, dt):
            return jax.ShapeDtypeStruct(shape, dt)

        batches = {"inputs": arr((S, n, B, T), jnp.int32), "targets": arr((S, n, B, T), jnp.int32),
                   "mask": arr((S, n, B, T), jnp.float32)}
        self._chunk = jax.jit(jax.vmap(chunk_one, in_axes=(0, 0, 0, None, None)),
                              donate_argnums=(0, 1))
        self._eval = jax.jit(jax.vmap(eval_one))
        Be = task.B_eval
        # Lowering traces Python (main thread); compiling is XLA's (threads, in parallel).
        self.lowered = {
            "init": self._init.lower(keys),
            "chunk": self._chunk.lower(state_abs[0], state_abs[1], batches, i32, f32),
            "eval": self._eval.lower(state_abs[0], arr((S, Be, T), jnp.int32),
                                     arr((S, Be, T), jnp.int32), arr((S, Be, T), jnp.float32)),
        }
        self.compiled: dict[str, Any] = {}
        self.compile_s: dict[str, float] = {}

    def compile(self, which: str) -> None:
        t = time.perf_counter()
        self.compiled[which] = self.lowered[which].compile()
        self.compile_s[which] = time.perf_counter() - t


# ----------------------------------------------------------------------------- the run


class Prefetcher:
    """Generates each round's training batches (every task, every seed) in a background thread,
    one round ahead."""

    def __init__(self, tasks, seeds, n):
        self.tasks, self.seeds, self.n = tasks, seeds, n
        self.q: queue.Queue = queue.Queue(maxsize=1)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._work, daemon=True)
        self.thread.start()

    def _work(self):
        r = 0
        while not self.stop.is_set():
            data = {name: stack_rounds(t, self.seeds, r * self.n, self.n)
                    for name, t in self.tasks.items()}
            while not self.stop.is_set():
                try:
                    self.q.put(data, timeout=0.2)
                    break
                except queue.Full:
                    continue
            r += 1

    def get(self):
        return self.q.get()

    def close(self):
        self.stop.set()


def run_experiment(prof: Profile, *, budget_minutes: float, implementation: str | None,
                   log=print) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp

    from qdelta_jax import diagnostics

    t_start = time.perf_counter()
    deadline = t_start + 60.0 * budget_minutes
    # Held back for evaluation, the diagnostic, JSON, plots and docs after training.
    reserve = 8.0 + 0.04 * 60.0 * budget_minutes
    seeds = list(prof.seeds)
    S = len(seeds)
    tasks = {name: TASK_CLASSES[name](prof) for name in prof.tasks}
    groups = [(v, t) for t in prof.tasks for v in prof.variants]
    dev = jax.devices()[0]
    log(f"[recall] profile {prof.name}: {len(prof.variants)} variants x {len(tasks)} tasks x "
        f"{S} seeds on {dev.platform} ({dev.device_kind}); budget {budget_minutes:.2f} min")

    # ---- build and compile every program up front
    progs: dict[tuple[str, str], Programs] = {}
    t0 = time.perf_counter()
    for v, t in groups:
        cfg = model_config(prof, v, tasks[t].vocab, implementation)
        progs[(v, t)] = Programs(cfg, tasks[t], prof, S)
    t_lower = time.perf_counter() - t0
    jobs = [(p, w) for p in progs.values() for w in ("init", "chunk", "eval")]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=min(16, len(jobs))) as ex:
        list(ex.map(lambda j: j[0].compile(j[1]), jobs))
    t_compile = time.perf_counter() - t0
    log(f"[recall] lowered {len(progs)} (variant, task) groups in {t_lower:.1f} s, compiled "
        f"{len(jobs)} programs in {t_compile:.1f} s (parallel)")

    # ---- init
    keys = jax.vmap(jax.random.key)(jnp.asarray(seeds, jnp.uint32))
    states = {g: p.compiled["init"](keys) for g, p in progs.items()}
    n = prof.chunk_steps
    prefetch = Prefetcher(tasks, seeds, n)

    # ---- train, round by round (each round: n steps of every group)
    max_rounds = max(1, prof.max_steps // n)
    min_rounds = max(1, min(prof.min_steps // n, max_rounds))
    total_rounds = max_rounds  # provisional; fixed after the calibration rounds
    decided = False
    curves: dict[tuple[str, str], list[np.ndarray]] = {g: [] for g in groups}  # [S, n, B]
    losses: dict[tuple[str, str], list[np.ndarray]] = {g: [] for g in groups}  # [S, n]
    counts: dict[str, list[np.ndarray]] = {t: [] for t in tasks}  # masked tokens [S, n, B]
    train_s = {g: 0.0 for g in groups}
    data_wait = 0.0
    round_times = []
    stopped_early = False
    r = 0
    t_train0 = time.perf_counter()
    while r < total_rounds:
        tr = time.perf_counter()
        data = prefetch.get()
        data_wait += time.perf_counter() - tr
        dev_data = {t: jax.device_put(data[t]) for t in tasks}
        for t in tasks:
            counts[t].append(data[t]["mask"].sum(-1))
        for g in groups:
            v, t = g
            tg = time.perf_counter()
            params, opt = states[g]
            params, opt, loss, rows = progs[g].compiled["chunk"](
                params, opt, dev_data[t], jnp.int32(r * n), jnp.float32(total_rounds * n))
            states[g] = (params, opt)
            loss, rows = jax.device_get((loss, rows))
            train_s[g] += time.perf_counter() - tg
            losses[g].append(np.asarray(loss))
            curves[g].append(np.asarray(rows))
        r += 1
        now = time.perf_counter()
        round_times.append(now - tr)
        if not decided and r >= prof.calib_rounds:
            per_round = round_times[-1]
            fit = int((deadline - reserve - now) // per_round)
            total_rounds = int(min(max_rounds, max(min_rounds, r + fit)))
            decided = True
            log(f"[recall] {per_round:.2f} s a round of {n} steps x {len(groups)} groups; "
                f"training {total_rounds * n} steps ({total_rounds} rounds)")
        if r % max(1, total_rounds // 10) == 0 or r == total_rounds:
            msg = ", ".join(f"{v}/{t} {float(np.mean(losses[(v, t)][-1][:, -1])):.3f}"
                            for v, t in groups)
            log(f"[recall] step {r * n}/{total_rounds * n} ({now - t_start:.0f} s): loss {msg}")
        if decided and r < total_rounds and now + round_times[-1] > deadline - reserve:
            stopped_early = True
            log(f"[recall] stopping early at step {r * n}: the budget would be exceeded "
                "(the lr schedule did not finish)")
            break
    prefetch.close()
    steps_done = r * n
    t_train = time.perf_counter() - t_train0

    # ---- evaluate and diagnose
    t0 = time.perf_counter()
    runs, diag, lam_stats, group_meta = [], {}, {}, {}
    for t, task in tasks.items():
        ev = [task.eval_batch(s) for s in seeds]
        ev = {k: np.stack([e[k] for e in ev]) for k in ev[0]}  # [S, Be, T]
        ev_dev = {k: jax.device_put(ev[k]) for k in ("inputs", "targets", "mask")}
        count = ev["mask"].sum(-1)  # [S, Be]
        for v in prof.variants:
            g = (v, t)
            nll, correct, bc, lam = jax.device_get(progs[g].compiled["eval"](
                states[g][0], ev_dev["inputs"], ev_dev["targets"], ev_dev["mask"]))
            exact = (correct == count) & (count > 0)
            # Training loss curve per setting: mean over each round's steps, per seed.
            rows = np.concatenate(curves[g], axis=1)  # [S, steps, B]
            cnt_train = np.concatenate(counts[t], axis=1)  # [S, steps, B]
            curve_steps = [(i + 1) * n for i in range(len(curves[g]))]
            per_setting = task.n_settings == len(set(task.row_setting.tolist()))
            for si, seed in enumerate(seeds):
                for j in range(task.n_settings):
                    sel = task.eval_row_setting == j
                    # NIAH trains at random depths: its curve is the one of every row.
                    tsel = (task.row_setting == j) if per_setting else np.ones(task.B, bool)
                    num = rows[si][:, tsel].sum(-1).reshape(-1, n).sum(-1)
                    den = np.maximum(cnt_train[si][:, tsel].sum(-1).reshape(-1, n).sum(-1), 1)
                    runs.append({
                        "variant": v, "task": t, "setting": task.setting(j), "seed": seed,
                        "accuracy": float(correct[si][sel].sum() / max(count[si][sel].sum(), 1)),
                        "exact_match": float(exact[si][sel].mean()),
                        "eval_loss": float(nll[si][sel].sum() / max(count[si][sel].sum(), 1)),
                        "eval_rows": int(sel.sum()),
                        "loss_curve": {"step": curve_steps,
                                       "loss": [float(x) for x in num / den]},
                        "train_loss_curve_all_settings": [
                            float(x) for x in np.concatenate(losses[g], axis=1)[si]
                            .reshape(-1, n).mean(-1)],
                        "wall_s": train_s[g],
                    })
            valid = ev["valid"]  # [S, Be, T]
            bc_layers = [bc[:, i] for i in range(bc.shape[1])]  # [S, Be, T, H] each
            diag.setdefault(v, {})[t] = diagnostics.summary_from_beta_c(bc_layers, valid)
            lam_layers = [lam[:, i] for i in range(lam.shape[1])]
            lam_stats.setdefault(v, {})[t] = _lam_summary(lam_layers, valid)
            group_meta.setdefault(v, {})[t] = {
                "train_wall_s": train_s[g], "compile_s": progs[g].compile_s,
                "params": progs[g].n_params,
            }
    t_eval = time.perf_counter() - t0
    log(f"[recall] evaluated in {t_eval:.1f} s")

    meta = {
        "profile": dataclasses.asdict(prof),
        "variants": {v: VARIANTS[v]["label"] for v in prof.variants},
        "device": {"platform": dev.platform, "kind": dev.device_kind,
                   "count": jax.device_count()},
        "versions": _versions(),
        "implementation": implementation or _default_impl(),
        "budget_minutes": budget_minutes,
        "steps": steps_done,
        "planned_steps": total_rounds * n,
        "stopped_early": stopped_early,
        "lower_s": t_lower,
        "compile_s": t_compile,
        "train_s": t_train,
        "data_wait_s": data_wait,
        "eval_s": t_eval,
        "groups": group_meta,
        "mqar_vocab": prof.mqar_vocab,
        "model": {v: progs[(v, prof.tasks[0])].cfg.to_dict() for v in prof.variants},
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
    }
    meta["wall_s"] = time.perf_counter() - t_start
    return {"meta": meta, "runs": runs, "diagnostics": diag, "lam": lam_stats}


def _lam_summary(layers, valid) -> list[dict[str, Any]]:
    out = []
    for i, lam in enumerate(layers):
        lam = np.asarray(lam, np.float64)
        heads = []
        for h in range(lam.shape[-1]):
            x = lam[..., h][valid]
            heads.append({"head": h, "mean": float(x.mean()), "q5": float(np.quantile(x, 0.05)),
                          "q50": float(np.quantile(x, 0.5)), "q95": float(np.quantile(x, 0.95))})
        out.append({"layer": i, "heads": heads})
    return out


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for mod in ("jax", "jaxlib", "flax", "optax", "numpy"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 -- a version string is only informative
            pass
    return out


def _default_impl() -> str:
    from qdelta_jax.ops import default_implementation

    return default_implementation()


# ----------------------------------------------------------------------------- reporting


def aggregate(runs: list[dict], key: str) -> dict[tuple, tuple[float, float, int]]:
    """``(variant, task, setting items) -> (mean, std over seeds, n seeds)`` of ``key``."""
    acc: dict[tuple, list[float]] = {}
    for r in runs:
        k = (r["variant"], r["task"], tuple(sorted(r["setting"].items())))
        acc.setdefault(k, []).append(r[key])
    return {k: (float(np.mean(v)), float(np.std(v)), len(v)) for k, v in acc.items()}


def _metric(task: str) -> str:
    return "exact_match" if task == "niah" else "accuracy"


def _pm(m: float, s: float) -> str:
    return f"{100 * m:.1f} ± {100 * s:.1f}"


def _settings(runs, task):
    seen = []
    for r in runs:
        if r["task"] == task and r["setting"] not in seen:
            seen.append(r["setting"])
    return seen


def _skey(setting) -> tuple:
    return tuple(sorted(setting.items()))


def tables(res: dict) -> dict[str, str]:
    """Markdown tables of final recall per variant and setting (mean ± std over seeds)."""
    out = {}
    runs = res["runs"]
    variants = list(res["meta"]["variants"])
    for task in res["meta"]["profile"]["tasks"]:
        metric = _metric(task)
        agg = aggregate([r for r in runs if r["task"] == task], metric)
        sets = _settings(runs, task)
        if task == "mqar":
            heads = [f"T {s['seq_len']}, P {s['num_pairs']}" for s in sets]
        else:
            heads = [f"depth {s['depth']:g}" for s in sets]
        lines = ["| variant | " + " | ".join(heads) + " | mean |",
                 "| --- |" + " --- |" * (len(heads) + 1)]
        for v in variants:
            cells, means = [], []
            for s in sets:
                m, sd, _ = agg[(v, task, _skey(s))]
                best = max(agg[(w, task, _skey(s))][0] for w in variants)
                cell = _pm(m, sd)
                cells.append(f"**{cell}**" if m == best else cell)
                means.append(m)
            lines.append(f"| {res['meta']['variants'][v]} | " + " | ".join(cells)
                         + f" | {100 * np.mean(means):.1f} |")
        out[task] = "\n".join(lines)
    return out


def observations(res: dict) -> list[str]:
    """Plain statements computed from the numbers (the draft of the 'what it says' paragraph)."""
    runs, variants = res["runs"], list(res["meta"]["variants"])
    label = res["meta"]["variants"]
    notes = []
    for task in res["meta"]["profile"]["tasks"]:
        metric = _metric(task)
        agg = aggregate([r for r in runs if r["task"] == task], metric)
        sets = _settings(runs, task)
        what = "recall accuracy" if task == "mqar" else "exact match"
        means = {v: float(np.mean([agg[(v, task, _skey(s))][0] for s in sets])) for v in variants}
        order = sorted(variants, key=lambda v: -means[v])
        notes.append(f"{task.upper()}: mean {what} over settings: " + ", ".join(
            f"{label[v]} {100 * means[v]:.1f}%" for v in order) + ".")
        if "qdelta" in variants:
            losses, ties = [], []
            for s in sets:
                mq, sq, _ = agg[("qdelta", task, _skey(s))]
                for w in variants:
                    if w == "qdelta":
                        continue
                    mw, sw, _ = agg[(w, task, _skey(s))]
                    name = (f"T {s['seq_len']} P {s['num_pairs']}" if task == "mqar"
                            else f"depth {s['depth']:g}")
                    if mw > mq + max(sq, sw):
                        losses.append(f"{name}: {label[w]} {_pm(mw, sw)} vs {_pm(mq, sq)}")
                    elif mw > mq:
                        ties.append(name)
            if losses:
                notes.append(f"{task.upper()}: Q-Delta loses by more than one seed std at: "
                             + "; ".join(losses) + ".")
            else:
                notes.append(f"{task.upper()}: no variant beats Q-Delta by more than one seed "
                             "std in any setting.")
            if ties:
                notes.append(f"{task.upper()}: another variant is ahead of Q-Delta within one "
                             f"seed std at: {', '.join(sorted(set(ties)))}.")
    for v in ("qdelta", "qdelta-neg"):
        for task, s in res.get("diagnostics", {}).get(v, {}).items():
            o = s["overall"]
            notes.append(f"Stability ({label.get(v, v)}, {task}): beta*c in "
                         f"[{o['min']:.3f}, {o['max']:.3f}], median {o['q50']:.3f}; "
                         f"{100 * o['outside']:.3f}% of steps outside (0, 2).")
    return notes


def plot_all(res: dict, docs: Path) -> list[Path]:
    """Writes the PNGs; returns their paths (empty without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    runs, meta = res["runs"], res["meta"]
    variants, label = list(meta["variants"]), meta["variants"]
    tasks = meta["profile"]["tasks"]
    device = meta.get("device_note") or meta["device"]["kind"]
    paths = []

    def save(fig, name: str) -> None:
        fig.tight_layout()
        fig.savefig(docs / name, dpi=110)
        plt.close(fig)
        paths.append(docs / name)

    if "mqar" in tasks:
        agg = aggregate([r for r in runs if r["task"] == "mqar"], "accuracy")
        sets = _settings(runs, "mqar")
        pairs = sorted({s["num_pairs"] for s in sets})
        fig, axes = plt.subplots(1, len(pairs), figsize=(4.2 * len(pairs), 3.6), squeeze=False)
        for ax, P in zip(axes[0], pairs, strict=True):
            Ts = sorted(s["seq_len"] for s in sets if s["num_pairs"] == P)
            for i, v in enumerate(variants):
                m = [agg[(v, "mqar", _skey({"seq_len": T, "num_pairs": P}))] for T in Ts]
                # Lengths double: one slot per length, variants dodged inside it.
                x = np.arange(len(Ts)) + 0.06 * (i - (len(variants) - 1) / 2)
                ax.errorbar(x, [100 * a[0] for a in m], yerr=[100 * a[1] for a in m],
                            marker="o", capsize=3, label=label[v], color=COLORS.get(v))
            ax.set_xticks(np.arange(len(Ts)), [str(T) for T in Ts])
            ax.set_xlim(-0.5, len(Ts) - 0.5)
            ax.set_ylim(-2, 102)
            ax.set_title(f"MQAR, {P} key-value pairs")
            ax.set_xlabel("sequence length T")
            ax.set_ylabel("recall accuracy (%)")
            ax.grid(alpha=0.3)
        axes[0][0].legend(fontsize=8)
        fig.suptitle(f"Recall vs sequence length (mean ± std over seeds; {device})", fontsize=10)
        save(fig, "recall_mqar_vs_length.png")

    fig, axes = plt.subplots(1, len(tasks), figsize=(5.2 * len(tasks), 3.6), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        for v in variants:
            rs = [r for r in runs if r["task"] == task and r["variant"] == v]
            by_seed: dict[int, list] = {}
            for r in rs:
                by_seed.setdefault(r["seed"], r["train_loss_curve_all_settings"])
            curves = np.array(list(by_seed.values()))
            steps = rs[0]["loss_curve"]["step"]
            mean, sd = curves.mean(0), curves.std(0)
            ax.plot(steps, mean, label=label[v], color=COLORS.get(v))
            ax.fill_between(steps, mean - sd, mean + sd, alpha=0.2, color=COLORS.get(v))
        ax.set_xlabel("step")
        ax.set_ylabel("training loss (masked positions)")
        ax.set_title(f"{task.upper()} training loss" + (" (all settings)" if task == "mqar"
                                                        else " (pass-key)"))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    save(fig, "recall_loss_curves.png")

    if "niah" in tasks:
        agg = aggregate([r for r in runs if r["task"] == "niah"], "exact_match")
        sets = _settings(runs, "niah")
        fig, ax = plt.subplots(figsize=(5.2, 3.6))
        ds = [s["depth"] for s in sets]
        for i, v in enumerate(variants):
            m = [agg[(v, "niah", _skey(s))] for s in sets]
            ax.errorbar(np.array(ds) + 0.008 * (i - len(variants) / 2), [100 * a[0] for a in m],
                        yerr=[100 * a[1] for a in m], marker="o", capsize=3, label=label[v],
                        color=COLORS.get(v))
        ax.set_ylim(-2, 102)
        ax.set_xlabel("needle depth")
        ax.set_ylabel("exact match (%)")
        ax.set_title(f"Pass-key retrieval, T = {sets[0]['seq_len']} bytes")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        save(fig, "recall_niah_depth.png")
    return paths


def write_docs(res: dict, docs: Path, json_path: Path | None, command: str) -> Path:
    """Writes ``docs/RESULTS.md`` (and the plots) from a result dict."""
    from qdelta_jax import diagnostics

    docs.mkdir(parents=True, exist_ok=True)
    pngs = plot_all(res, docs)
    meta, prof = res["meta"], res["meta"]["profile"]
    device = meta.get("device_note") or f"{meta['device']['kind']} ({meta['device']['platform']})"
    quick = prof["name"] != "full"
    tabs = tables(res)
    notes = observations(res)
    m0 = meta["model"][next(iter(meta["model"]))]
    params = {v: g[next(iter(g))]["params"] for v, g in meta["groups"].items()}
    L = []
    L.append("# Recall at small scale: Q-Delta against Gated DeltaNet, fixed lam and DeltaNet")
    L.append("")
    if quick:
        L.append(f"> **This is the `{prof['name']}` profile run on {device}**: a first look with a "
                 "tiny model and a few hundred steps, not the result. It is replaced by the GPU "
                 "run (`--budget-minutes 5`, profile `full`).")
        L.append("")
    L.append("Generated by `experiments/recall.py` "
             + (f"from `{json_path}` " if json_path else "") + f"on {meta['date']}.")
    L.append("")
    L.append("## What was run")
    L.append("")
    L.append(f"- Command: `{command}`")
    L.append(f"- Device: {device}; JAX {meta['versions'].get('jax', '?')}, Flax "
             f"{meta['versions'].get('flax', '?')}; Q-Delta op implementation "
             f"`{meta['implementation']}`; float32.")
    L.append(f"- Wall time {meta['wall_s']:.0f} s in all (budget {meta['budget_minutes']:g} min): "
             f"lowering {meta['lower_s']:.0f} s, compiling {meta['compile_s']:.0f} s "
             f"({len(meta['groups']) * len(prof['tasks']) * 3} programs in parallel threads), "
             f"training {meta['train_s']:.0f} s, evaluation {meta['eval_s']:.0f} s.")
    L.append(f"- Model (every variant): {m0['num_hidden_layers']} layers, width "
             f"{m0['hidden_size']}, {m0['num_heads']} heads of key dim {m0['head_dim']} (value dim "
             f"{int(m0['expand_v'] * m0['head_dim'])}), short conv, output gate, SwiGLU MLP, chunk "
             f"{m0['chunk_size']}; parameters: " + ", ".join(
                 f"{v} {params[v] / 1e6:.3f}M" for v in params) + " (MQAR vocabulary).")
    L.append("- Variants: " + "; ".join(f"`{v}` = {lab}" for v, lab in meta["variants"].items())
             + ". Same initial seed, data and schedule for every variant.")
    L.append(f"- Training: {meta['steps']} steps" + (
        f" (planned {meta['planned_steps']}: stopped early, the budget ran out)"
        if meta["stopped_early"] else "")
        + f", AdamW (b2 0.95, weight decay {prof['weight_decay']}, clip 1.0), peak lr "
          f"{prof['lr']:g}, {prof['warmup']} warm-up steps, cosine to 0.1x; seeds "
          f"{', '.join(str(s) for s in prof['seeds'])} (init and data), trained together "
          "(vmapped).")
    if "mqar" in prof["tasks"]:
        sets = ", ".join(f"(T {T}, P {P})" for T, P in prof["mqar_settings"])
        L.append(f"- MQAR: vocabulary {prof['mqar_vocab']}; one model per variant and seed "
                 f"trained on a mixture of the settings {sets}, {prof['mqar_rows']} rows of each "
                 f"per batch (rows padded at the end to the longest T, padding masked); evaluated "
                 f"on {prof['mqar_eval_rows']} held-out rows per setting and seed. Metric: token "
                 "accuracy on the queried values.")
    if "niah" in prof["tasks"]:
        L.append(f"- Needle in a haystack: pass-key (5 digits in repeated filler), bytes, T = "
                 f"{prof['niah_len']}, {prof['niah_rows']} rows a batch at random depths; "
                 f"evaluated at depths {', '.join(f'{d:g}' for d in prof['niah_depths'])} on "
                 f"{prof['niah_eval_rows']} held-out rows each per seed. Metric: exact match of "
                 "the answer (teacher-forced, so equal to greedy decoding of it).")
    L.append("")
    L.append("## Final recall (%), mean ± std over seeds")
    L.append("")
    for task, tab in tabs.items():
        L.append(f"**{task.upper()}** ({'recall accuracy' if task == 'mqar' else 'exact match'};"
                 " best per column in bold)")
        L.append("")
        L.append(tab)
        L.append("")
    names = [p.name for p in pngs]
    if names:
        L.append("## Plots")
        L.append("")
        for n_ in names:
            L.append(f"![{n_}]({n_})")
            L.append("")
    else:
        L.append("(No plots: matplotlib was not importable; re-render with "
                 "`python experiments/recall.py --from-json OUT/recall.json`.)")
        L.append("")
    L.append("## Stability diagnostic of the trained Q-Delta model")
    L.append("")
    L.append("`beta_t * c_t` with `c_t = k_t . (k_t + lam_t q_t)` (docs/MATH.md section 1; a write "
             "contracts the prediction error when it lies in (0, 2)), on every real token of the "
             "evaluation rows, pooled over seeds (`qdelta_jax.diagnostics`).")
    L.append("")
    for v in ("qdelta", "qdelta-neg"):
        for task, s in res.get("diagnostics", {}).get(v, {}).items():
            L.append(f"**{meta['variants'][v]}, {task.upper()}**")
            L.append("")
            L.append(diagnostics.format_table(s, markdown=True))
            L.append("")
            lam = res.get("lam", {}).get(v, {}).get(task)
            if lam:
                L.append("Learned lam (mean [5%, 95%] per layer and head): " + "; ".join(
                    f"layer {ly['layer']} head {h['head']}: {h['mean']:.3f} "
                    f"[{h['q5']:.3f}, {h['q95']:.3f}]" for ly in lam for h in ly["heads"]) + ".")
                L.append("")
    others = [(v, t, s) for v, d in res.get("diagnostics", {}).items() if v not in
              ("qdelta", "qdelta-neg") for t, s in d.items()]
    if others:
        L.append("Other variants (share of steps outside (0, 2), max of beta*c): " + "; ".join(
            f"{v}/{t} {100 * s['overall']['outside']:.3f}% (max {s['overall']['max']:.3f})"
            for v, t, s in others) + ".")
        L.append("")
    L.append("## What the numbers say")
    L.append("")
    L.append("<!-- auto: computed from the numbers; the paragraph after the list is written by "
             "hand -->")
    for n_ in notes:
        L.append(f"- {n_}")
    L.append("")
    L.append(_READING)
    L.append("")
    path = docs / "RESULTS.md"
    path.write_text("\n".join(L))
    return path


_READING = (
    "Reading: these are tiny models (well under a million parameters outside the embeddings) "
    "trained for minutes, with one learning rate shared by every variant and three seeds; a "
    "difference smaller than the seed spread is not a result. The paper's claims are at 340M and "
    "1.3B parameters on FineWeb-Edu (docs/MATH.md section 5), and this experiment can only say "
    "whether the "
    "direction of the effect shows up on synthetic recall at this scale."
)


# ----------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="recall.py", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="CPU-sized profile (1-2 minutes)")
    g.add_argument("--smoke", action="store_true", help="seconds-long end-to-end check")
    p.add_argument("--budget-minutes", type=float, default=None,
                   help="wall-time budget in minutes, compilation included; sets the number of "
                        "steps (default: full 5, quick 2)")
    p.add_argument("--max-steps", type=int, help="cap on the number of steps (profile default)")
    p.add_argument("--variants", help=f"comma-separated subset of {', '.join(VARIANTS)}")
    p.add_argument("--tasks", help="comma-separated subset of mqar, niah")
    p.add_argument("--implementation", default="default",
                   help="Q-Delta op implementation: xla, pallas, reference, auto (the library's "
                        "choice: pallas on GPUs), or default: xla (the chunked jnp path: quick "
                        "to compile)")
    p.add_argument("--out", default="out/recall", help="folder for recall.json (default "
                                                       "out/recall)")
    p.add_argument("--docs", default=str(ROOT / "docs"),
                   help="folder for RESULTS.md and the PNGs (default docs/)")
    p.add_argument("--device-note", help="how to name the device in RESULTS.md, e.g. 'H100 80GB'")
    p.add_argument("--from-json", help="re-render the docs from a saved recall.json; no training")
    a = p.parse_args(argv)
    import faulthandler
    import signal

    if hasattr(signal, "SIGUSR1"):  # `kill -USR1 PID` prints every thread's stack
        faulthandler.register(signal.SIGUSR1)
    _bootstrap_package()
    command = "python experiments/recall.py " + " ".join(shlex.quote(x) for x in (
        argv if argv is not None else sys.argv[1:]))

    if a.from_json:
        res = json.loads(Path(a.from_json).read_text())
        if a.device_note:
            res["meta"]["device_note"] = a.device_note
        path = write_docs(res, Path(a.docs), Path(a.from_json), res["meta"].get("command",
                                                                                 command))
        print(f"[recall] wrote {path}")
        return 0

    prof = PROFILES["quick" if a.quick else "smoke" if a.smoke else "full"]
    over: dict[str, Any] = {}
    if a.max_steps:
        over["max_steps"] = a.max_steps
        over["min_steps"] = min(prof.min_steps, a.max_steps)
    if a.variants:
        vs = tuple(x.strip() for x in a.variants.split(",") if x.strip())
        bad = [x for x in vs if x not in VARIANTS]
        if bad:
            p.error(f"--variants: unknown {bad}; choose from {', '.join(VARIANTS)}")
        over["variants"] = vs
    if a.tasks:
        ts = tuple(x.strip() for x in a.tasks.split(",") if x.strip())
        if not ts or any(x not in TASK_CLASSES for x in ts):
            p.error(f"--tasks: choose from {', '.join(TASK_CLASSES)}")
        over["tasks"] = ts
    prof = dataclasses.replace(prof, **over)
    budget = a.budget_minutes if a.budget_minutes is not None else prof.budget_minutes
    impl = None if a.implementation == "auto" else a.implementation
    if impl == "default":
        impl = DEFAULT_IMPLEMENTATION

    res = run_experiment(prof, budget_minutes=budget, implementation=impl)
    res["meta"]["command"] = command
    if a.device_note:
        res["meta"]["device_note"] = a.device_note
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "recall.json"
    json_path.write_text(json.dumps(res, indent=1))
    print(f"[recall] wrote {json_path}")
    for task, tab in tables(res).items():
        print(f"\n{task} ({'recall accuracy' if task == 'mqar' else 'exact match'}, %):\n{tab}")
    for n_ in observations(res):
        print(f"- {n_}")
    path = write_docs(res, Path(a.docs), json_path, command)
    print(f"[recall] wrote {path}; total {res['meta']['wall_s']:.0f} s before docs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
