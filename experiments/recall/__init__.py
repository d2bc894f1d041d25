"""Recall experiments at small scale: Q-Delta against its reductions on MQAR and needle retrieval.

Four variants of the same model (same size, steps, data and seeds; docs/MATH.md sections 1 and 5):

* ``qdelta``    -- Q-Delta, learned ``lam = sigmoid(W_lam x - 0.9)``;
* ``gdn``       -- ``lam`` fixed at 0: exactly Gated DeltaNet;
* ``lam0.5``    -- ``lam`` fixed at 0.5 (the paper's fixed-lam ablation);
* ``deltanet``  -- ``lam = 0`` and no decay gate (``a = 1``): DeltaNet.

(``qdelta-neg``, Q-Delta with ``allow_neg_eigval``, can be added with ``--variants``.)

Tasks (docs/MATH.md section 6, data from :mod:`qdelta_jax.train.data`):

* ``mqar`` -- one model per variant and seed is trained on a mixture of (sequence length T,
  key-value pairs P) settings, as Zoology does. Recall accuracy = token accuracy on the queried
  values, reported per setting on held-out rows.
* ``niah`` -- single needle, pass-key variant (5-digit number in repeated filler, byte tokens),
  trained at a random needle depth; exact match of the answer at fixed depths on held-out rows.

Training is :mod:`qdelta_jax.train.loop`'s (its AdamW, lr schedule and masked loss), with the
seeds of a variant stacked and ``jax.vmap``-ed and a time budget that sets the number of steps.

Outputs: ``OUT/recall.json`` (per run: variant, task, setting, seed, final recall accuracy, loss
curve, wall time; plus the stability diagnostic of every trained variant) and, in ``--docs``
(default ``docs/``), ``RESULTS.md`` and the PNG plots. ``--from-json OUT/recall.json``
re-renders the docs from a saved result without training.

Modules: :mod:`~experiments.recall.models` (the variants), :mod:`~experiments.recall.profiles`
(what sizes a run), :mod:`~experiments.recall.tasks` (the data), :mod:`~experiments.recall.training`
and :mod:`~experiments.recall.evaluation` (the compiled programs),
:mod:`~experiments.recall.experiment` (one run within the budget),
:mod:`~experiments.recall.report` (tables, plots, RESULTS.md) and ``__main__`` (the command line).

Usage, from the repository root::

    python -m experiments.recall --budget-minutes 5 --device-note "H100 80GB"   # the GPU run
    python -m experiments.recall --quick --out out/recall-quick              # CPU, 1-2 minutes
    python -m experiments.recall --smoke --out /tmp/r --docs /tmp/r          # seconds: the test
"""
