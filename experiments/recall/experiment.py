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
    """The programs of one (variant, task), their compiled forms and the training state."""

    train: TrainPrograms
    eval: EvalProgram
    compiled: dict[str, Any] = dataclasses.field(default_factory=dict)
    compile_s: dict[str, float] = dataclasses.field(default_factory=dict)
    state: Any = None  # (params, opt_state), leading seed axis
    train_s: float = 0.0
    losses: list = dataclasses.field(default_factory=list)  # per round [S, n]
    rows: list = dataclasses.field(default_factory=list)  # per round [S, n, B]

    def compile(self, which: str) -> None:
        lowered = self.eval.lowered if which == "eval" else self.train.lowered[which]
        t = time.perf_counter()
        self.compiled[which] = lowered.compile()
        self.compile_s[which] = time.perf_counter() - t


@dataclasses.dataclass
class Training:
    """How the training phase went: steps run and planned, time, the masked tokens per row of
    each task's batches (per round ``[S, n, B]``)."""

    steps: int
    planned_steps: int
    stopped_early: bool
    train_s: float
    data_wait_s: float
    counts: dict[str, list]


def run_experiment(prof, *, budget_minutes: float, implementation: str | None,
                   log=print) -> dict[str, Any]:
    """Trains and evaluates every (variant, task) of ``prof`` for every seed; returns the result
    dict (``meta``, ``runs``, ``diagnostics``, ``lam``) that ``recall.json`` holds."""
    t_start = time.perf_counter()
    tasks = {name: TASKS[name](prof) for name in prof.tasks}
    dev = jax.devices()[0]
    log(f"[recall] profile {prof.name}: {len(prof.variants)} variants x {len(tasks)} tasks x "
        f"{len(prof.seeds)} seeds on {dev.platform} ({dev.device_kind}); budget "
        f"{budget_minutes:.2f} min")
    groups, t_lower, t_compile = build(prof, tasks, implementation, log)
    training = train(prof, tasks, groups, deadline=t_start + 60.0 * budget_minutes,
                     budget_minutes=budget_minutes, t_start=t_start, log=log)
    t0 = time.perf_counter()
    runs, diag, lam = evaluate(prof, tasks, groups, training)
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
        "steps": training.steps,
        "planned_steps": training.planned_steps,
        "stopped_early": training.stopped_early,
        "lower_s": t_lower,
        "compile_s": t_compile,
        "train_s": training.train_s,
        "data_wait_s": training.data_wait_s,
        "eval_s": t_eval,
        "groups": {v: {t: {"train_wall_s": groups[(v, t)].train_s,
                           "compile_s": groups[(v, t)].compile_s,
                           "params": groups[(v, t)].train.n_params} for t in prof.tasks}
                   for v in prof.variants},
        "mqar_vocab": prof.mqar_vocab,
        "model": {v: groups[(v, prof.tasks[0])].train.cfg.to_dict() for v in prof.variants},
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
    }
    meta["wall_s"] = time.perf_counter() - t_start
    return {"meta": meta, "runs": runs, "diagnostics": diag, "lam": lam}


def build(prof, tasks: dict, implementation: str | None, log=print):
    """Lowers the three programs of every (variant, task), then compiles them all in parallel
    threads; returns ``(groups, lowering seconds, compiling seconds)``."""
    t0 = time.perf_counter()
    groups: dict[tuple[str, str], Group] = {}
    for t, task in tasks.items():
        for v in prof.variants:
            programs = TrainPrograms(model_config(prof, v, task.vocab, implementation), task,
                                     prof, len(prof.seeds))
            groups[(v, t)] = Group(programs, EvalProgram(programs.fns, task, len(prof.seeds),
                                                         programs.abstract_params))
    t_lower = time.perf_counter() - t0
    jobs = [(g, w) for g in groups.values() for w in ("init", "chunk", "eval")]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=min(16, len(jobs))) as ex:
        list(ex.map(lambda j: j[0].compile(j[1]), jobs))
    t_compile = time.perf_counter() - t0
    log(f"[recall] lowered {len(groups)} (variant, task) groups in {t_lower:.1f} s, compiled "
        f"{len(jobs)} programs in {t_compile:.1f} s (parallel)")
    return groups, t_lower, t_compile


def train(prof, tasks: dict, groups: dict, *, deadline: float, budget_minutes: float,
          t_start: float, log=print) -> Training:
    """Initialises every group and trains round by round (each round: ``chunk_steps`` steps of
    every group) until the planned steps are done or the deadline nears."""
    # Held back for evaluation, the diagnostic, JSON, plots and docs after training.
    reserve = 8.0 + 0.04 * 60.0 * budget_minutes
    seeds = list(prof.seeds)
    keys = jax.vmap(jax.random.key)(jnp.asarray(seeds, jnp.uint32))
    for g in groups.values():
        g.state = g.compiled["init"](keys)
    n = prof.chunk_steps
    prefetch = Prefetcher(tasks, seeds, n)
    max_rounds = max(1, prof.max_steps // n)
    min_rounds = max(1, min(prof.min_steps // n, max_rounds))
    # Provisional until the calibration rounds are timed; those run in the warm-up, whose
    # rates do not depend on the total.
    total_rounds = max_rounds
    decided = False
    counts: dict[str, list[np.ndarray]] = {t: [] for t in tasks}
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
        for (_, t), g in groups.items():
            tg = time.perf_counter()
            params, opt, loss, rows = g.compiled["chunk"](*g.state, dev_data[t], rates)
            g.state = (params, opt)
            loss, rows = jax.device_get((loss, rows))
            g.train_s += time.perf_counter() - tg
            g.losses.append(np.asarray(loss))
            g.rows.append(np.asarray(rows))
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
            msg = ", ".join(f"{v}/{t} {float(np.mean(g.losses[-1][:, -1])):.3f}"
                            for (v, t), g in groups.items())
            log(f"[recall] step {r * n}/{total_rounds * n} ({now - t_start:.0f} s): loss {msg}")
        if decided and r < total_rounds and now + round_times[-1] > deadline - reserve:
            stopped_early = True
            log(f"[recall] stopping early at step {r * n}: the budget would be exceeded "
                "(the lr schedule did not finish)")
            break
    prefetch.close()
    return Training(steps=r * n, planned_steps=total_rounds * n, stopped_early=stopped_early,
                    train_s=time.perf_counter() - t_train0, data_wait_s=data_wait, counts=counts)


def evaluate(prof, tasks: dict, groups: dict, training: Training):
    """Runs every group's evaluation program on the held-out rows; returns the per-run records,
    the ``beta * c`` diagnostic and the ``lam`` statistics per variant and task."""
    runs, diag, lam_stats = [], {}, {}
    seeds = list(prof.seeds)
    for t, task in tasks.items():
        ev = eval_batches(task, seeds)  # [S, B_eval, T]
        ev_dev = [jax.device_put(ev[k]) for k in ("inputs", "targets", "mask")]
        for v in prof.variants:
            g = groups[(v, t)]
            sums, beta_c, lam = jax.device_get(g.compiled["eval"](g.state[0], *ev_dev))
            curves = {"rows": np.concatenate(g.rows, axis=1),
                      "counts": np.concatenate(training.counts[t], axis=1),
                      "losses": np.concatenate(g.losses, axis=1),
                      "steps_per_point": prof.chunk_steps}
            runs += run_records(v, task, seeds, sums, curves, g.train_s)
            valid = ev["valid"]  # [S, B_eval, T]
            diag.setdefault(v, {})[t] = diagnostics.summary_from_beta_c(
                [beta_c[:, i] for i in range(beta_c.shape[1])], valid)
            lam_stats.setdefault(v, {})[t] = lam_summary(
                [lam[:, i] for i in range(lam.shape[1])], valid)
    return runs, diag, lam_stats


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for mod in ("jax", "jaxlib", "flax", "optax", "numpy"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 -- a version string is only informative
            pass
    return out
