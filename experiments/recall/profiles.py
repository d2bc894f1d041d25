"""The profiles that size a run: model, data, steps and time budget."""

from __future__ import annotations

import dataclasses

from .models import DEFAULT_VARIANTS


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
