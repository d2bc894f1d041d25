"""One run of the experiment: build and compile every program, train within the time budget,
evaluate, and return the result dict that ``recall.json`` holds.

Time (the GPU run has to fit about five minutes of one GPU, compilation included):

* each (variant, task) has exactly three programs (init, train chunk, eval), all lowered first
  and compiled in parallel threads ahead of time;
* training goes in rounds of ``chunk_steps`` steps of every (variant, task); after
  ``calib_rounds`` rounds the measured time per round fixes how many rounds fit in the budget
  (at least ``min_steps``, at most ``max_steps``), and with it the lr schedule's total; a hard
  deadline stops training early (and says so) if the device slows down later;
* the training data of a round is generated on the host in a background thread while the device
  trains the previous round; every variant sees the same batches.
"""

from __future__ import annotations

import dataclasses
import datetime
import platform
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from qdelta_jax import diagnostics
from qdelta_jax.ops import default_implementation

from .evaluation import EvalProgram, lam_summary, run_records
from .models import VARIANTS, model_config
from .tasks import TASKS, Prefetcher, eval_batches
from .training import TrainPrograms, learning_rates


@dataclasses.dataclass
class Group:
    """The programs of one (variant, task) and their compiled forms."""

    train: TrainPrograms
    eval: EvalProgram
    compiled: dict[str, Any] = dataclasses.field(default_factory=dict)
    compile_s: dict[str, float] = dataclasses.field(default_factory=dict)

    def lowered(self, which: str):
        return self.eval.lowered if which == "eval" else self.train.lowered[which]

    def compile(self, which: str) -> None:
        t = time.perf_counter()
        self.compiled[which] = self.lowered(which).compile()
        self.compile_s[which] = time.perf_counter() - t


def run_experiment(prof, *, budget_minutes: float, implementation: str | None,
                   log=print) -> dict[str, Any]:
    """Trains and evaluates every (variant, task) of ``prof`` for every seed; returns the result
    dict (``meta``, ``runs``, ``diagnostics``, ``lam``) that ``recall.json`` holds."""
    t_start = time.perf_counter()
    deadline = t_start + 60.0 * budget_minutes
    # Held back for evaluation, the diagnostic, JSON, plots and docs after training.
    reserve = 8.0 + 0.04 * 60.0 * budget_minutes
    seeds = list(prof.seeds)
    S = len(seeds)
    tasks = {name: TASKS[name](prof) for name in prof.tasks}
    keys_ = [(v, t) for t in prof.tasks for v in prof.variants]
    dev = jax.devices()[0]
    log(f"[recall] profile {prof.name}: {len(prof.variants)} variants x {len(tasks)} tasks x "
        f"{S} seeds on {dev.platform} ({dev.device_kind}); budget {budget_minutes:.2f} min")

    # ---- build and compile every program up front
    groups: dict[tuple[str, str], Group] = {}
    t0 = time.perf_counter()
    for v, t in keys_:
        train = TrainPrograms(model_config(prof, v, tasks[t].vocab, implementation), tasks[t],
                              prof, S)
        groups[(v, t)] = Group(train, EvalProgram(train.fns, tasks[t], S, train.abstract_params))
    t_lower = time.perf_counter() - t0
    jobs = [(g, w) for g in groups.values() for w in ("init", "chunk", "eval")]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=min(16, len(jobs))) as ex:
        list(ex.map(lambda j: j[0].compile(j[1]), jobs))
    t_compile = time.perf_counter() - t0
    log(f"[recall] lowered {len(groups)} (variant, task) groups in {t_lower:.1f} s, compiled "
        f"{len(jobs)} programs in {t_compile:.1f} s (parallel)")

    # ---- init
    keys = jax.vmap(jax.random.key)(jnp.asarray(seeds, jnp.uint32))
    states = {k: g.compiled["init"](keys) for k, g in groups.items()}
    n = prof.chunk_steps
    prefetch = Prefetcher(tasks, seeds, n)

    # ---- train, round by round (each round: n steps of every group)
    max_rounds = max(1, prof.max_steps // n)
    min_rounds = max(1, min(prof.min_steps // n, max_rounds))
    # Provisional until the calibration rounds are timed; those run in the warm-up, whose
    # rates do not depend on the total.
    total_rounds = max_rounds
    decided = False
    rows: dict[tuple[str, str], list[np.ndarray]] = {k: [] for k in keys_}  # [S, n, B]
    losses: dict[tuple[str, str], list[np.ndarray]] = {k: [] for k in keys_}  # [S, n]
    counts: dict[str, list[np.ndarray]] = {t: [] for t in tasks}  # masked tokens [S, n, B]
    train_s = {k: 0.0 for k in keys_}
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
        rates = jnp.asarray(learning_rates(prof, total_rounds * n, r * n, n))
        for k in keys_:
            tg = time.perf_counter()
            params, opt = states[k]
            params, opt, loss, row = groups[k].compiled["chunk"](params, opt, dev_data[k[1]],
                                                                 rates)
            states[k] = (params, opt)
            loss, row = jax.device_get((loss, row))
            train_s[k] += time.perf_counter() - tg
            losses[k].append(np.asarray(loss))
            rows[k].append(np.asarray(row))
        r += 1
        now = time.perf_counter()
        round_times.append(now - tr)
        if not decided and r >= prof.calib_rounds:
            per_round = round_times[-1]
            fit = int((deadline - reserve - now) // per_round)
            total_rounds = int(min(max_rounds, max(min_rounds, r + fit)))
            decided = True
            log(f"[recall] {per_round:.2f} s a round of {n} steps x {len(keys_)} groups; "
                f"training {total_rounds * n} steps ({total_rounds} rounds)")
        if r % max(1, total_rounds // 10) == 0 or r == total_rounds:
            msg = ", ".join(f"{v}/{t} {float(np.mean(losses[(v, t)][-1][:, -1])):.3f}"
                            for v, t in keys_)
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
        ev = eval_batches(task, seeds)  # [S, B_eval, T]
        ev_dev = [jax.device_put(ev[k]) for k in ("inputs", "targets", "mask")]
        for v in prof.variants:
            k = (v, t)
            sums, beta_c, lam = jax.device_get(groups[k].compiled["eval"](states[k][0], *ev_dev))
            curves = {"rows": np.concatenate(rows[k], axis=1),
                      "counts": np.concatenate(counts[t], axis=1),
                      "losses": np.concatenate(losses[k], axis=1), "steps_per_point": n}
            runs += run_records(v, task, seeds, sums, curves, train_s[k])
            valid = ev["valid"]  # [S, B_eval, T]
            diag.setdefault(v, {})[t] = diagnostics.summary_from_beta_c(
                [beta_c[:, i] for i in range(beta_c.shape[1])], valid)
            lam_stats.setdefault(v, {})[t] = lam_summary(
                [lam[:, i] for i in range(lam.shape[1])], valid)
            group_meta.setdefault(v, {})[t] = {
                "train_wall_s": train_s[k], "compile_s": groups[k].compile_s,
                "params": groups[k].train.n_params,
            }
    t_eval = time.perf_counter() - t0
    log(f"[recall] evaluated in {t_eval:.1f} s")

    meta = {
        "profile": dataclasses.asdict(prof),
        "variants": {v: VARIANTS[v]["label"] for v in prof.variants},
        "device": {"platform": dev.platform, "kind": dev.device_kind,
                   "count": jax.device_count()},
        "versions": _versions(),
        "implementation": implementation or default_implementation(),
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
        "model": {v: groups[(v, prof.tasks[0])].train.cfg.to_dict() for v in prof.variants},
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
    }
    meta["wall_s"] = time.perf_counter() - t_start
    return {"meta": meta, "runs": runs, "diagnostics": diag, "lam": lam_stats}


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for mod in ("jax", "jaxlib", "flax", "optax", "numpy"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 -- a version string is only informative
            pass
    return out
