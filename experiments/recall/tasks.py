"""The two recall tasks as fixed-shape batches, and the background thread that prepares them.

Data come from :mod:`qdelta_jax.train.data` (docs/MATH.md section 6); a batch is a dict of
``inputs, targets [B, T] int32``, ``mask [B, T] float32`` (1 where the loss and the metrics
count) and ``valid [B, T] bool`` (real tokens, not padding).

* :class:`MQARTask` -- a mixture of (T, P) settings, as Zoology trains: every batch holds the
  same number of rows of each setting, each row padded at its end to the longest T. Padding is
  masked and, the model being causal, cannot affect the real tokens.
* :class:`NIAHTask` -- single-needle pass-key retrieval on bytes, trained at random depths and
  evaluated at fixed ones.

Rows of one setting are contiguous, in the order of ``settings``: ``row_setting`` and
``eval_row_setting`` give each row's setting index.
"""

from __future__ import annotations

import queue
import threading
from typing import Any

import numpy as np

from qdelta_jax.train.data import EVAL_STREAM, MQAR, NIAH, TRAIN_STREAM

Batch = dict[str, np.ndarray]


class MQARTask:
    """A mixture of MQAR settings in one fixed ``[B, T_max]`` shape (rows padded at the end)."""

    name = "mqar"

    def __init__(self, prof):
        self.settings = list(prof.mqar_settings)
        self.vocab = prof.mqar_vocab
        self.rows = prof.mqar_rows
        self.eval_rows = prof.mqar_eval_rows
        self.T = max(T for T, _ in self.settings)
        self.B = self.rows * len(self.settings)
        self.B_eval = self.eval_rows * len(self.settings)
        self.row_setting = np.repeat(np.arange(len(self.settings)), self.rows)
        self.eval_row_setting = np.repeat(np.arange(len(self.settings)), self.eval_rows)

    @property
    def n_settings(self) -> int:
        return len(self.settings)

    def setting(self, j: int) -> dict[str, Any]:
        T, P = self.settings[j]
        return {"seq_len": T, "num_pairs": P}

    def _source(self, j: int, seed: int, rows: int, stream: int) -> MQAR:
        T, P = self.settings[j]
        # A separate data seed per setting: settings drawn from one stream would share keys.
        return MQAR(rows, T, P, self.vocab, seed=1000 * seed + j, stream=stream)

    def _pad(self, parts: list[Batch]) -> Batch:
        def pad(a):
            return np.pad(a, ((0, 0), (0, self.T - a.shape[1])))

        out = {key: np.concatenate([pad(p[key]) for p in parts], axis=0)
               for key in ("inputs", "targets", "mask")}
        out["valid"] = np.concatenate([pad(np.ones(p["inputs"].shape, bool)) for p in parts],
                                      axis=0)
        return out

    def train_batch(self, seed: int, index: int) -> Batch:
        return self._pad([self._source(j, seed, self.rows, TRAIN_STREAM).batch(index)
                          for j in range(self.n_settings)])

    def eval_batch(self, seed: int) -> Batch:
        return self._pad([self._source(j, seed, self.eval_rows, EVAL_STREAM).batch(0)
                          for j in range(self.n_settings)])


class NIAHTask:
    """Pass-key retrieval on bytes; training at random depths, evaluation at fixed depths."""

    name = "niah"
    vocab = 256

    def __init__(self, prof):
        self.T = prof.niah_len
        self.depths = list(prof.niah_depths)
        self.B = prof.niah_rows
        self.eval_rows = prof.niah_eval_rows
        self.B_eval = self.eval_rows * len(self.depths)
        self.row_setting = np.zeros(self.B, int)
        self.eval_row_setting = np.repeat(np.arange(len(self.depths)), self.eval_rows)

    @property
    def n_settings(self) -> int:
        return len(self.depths)

    def setting(self, j: int) -> dict[str, Any]:
        return {"seq_len": self.T, "depth": self.depths[j]}

    def train_batch(self, seed: int, index: int) -> Batch:
        b = NIAH(self.B, self.T, "passkey", None, seed=seed, stream=TRAIN_STREAM).batch(index)
        return {**b, "valid": np.ones(b["inputs"].shape, bool)}

    def eval_batch(self, seed: int) -> Batch:
        parts = [NIAH(self.eval_rows, self.T, "passkey", d, seed=seed, stream=EVAL_STREAM).batch(0)
                 for d in self.depths]
        out = {k: np.concatenate([p[k] for p in parts]) for k in ("inputs", "targets", "mask")}
        out["valid"] = np.ones(out["inputs"].shape, bool)
        return out


TASKS = {"mqar": MQARTask, "niah": NIAHTask}


def stack_rounds(task, seeds, start: int, n: int) -> Batch:
    """Training batches of steps ``start .. start + n - 1`` for every seed: ``[S, n, B, T]``."""
    per_seed = []
    for s in seeds:
        steps = [task.train_batch(s, start + i) for i in range(n)]
        per_seed.append({k: np.stack([b[k] for b in steps])
                         for k in ("inputs", "targets", "mask")})
    return {k: np.stack([p[k] for p in per_seed]) for k in per_seed[0]}


def eval_batches(task, seeds) -> Batch:
    """The held-out rows of every seed: ``[S, B_eval, T]``."""
    ev = [task.eval_batch(s) for s in seeds]
    return {k: np.stack([e[k] for e in ev]) for k in ev[0]}


class Prefetcher:
    """Generates each round's training batches (every task, every seed) in a background thread,
    one round ahead, so that the host prepares data while the device trains."""

    def __init__(self, tasks: dict, seeds, n: int):
        self.tasks, self.seeds, self.n = tasks, seeds, n
        self.q: queue.Queue = queue.Queue(maxsize=1)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._work, daemon=True)
        self.thread.start()

    def _work(self) -> None:
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

    def get(self) -> dict[str, Batch]:
        return self.q.get()

    def close(self) -> None:
        self.stop.set()
