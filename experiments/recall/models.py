"""The variants compared: one model configuration each, the same size for all of them.

A variant differs from Q-Delta only in how ``lam`` (the query's share of the read vector) and the
decay gate are set (docs/MATH.md sections 1 and 5); everything else, including the parameter
count up to the ``lam`` projection, is shared.
"""

from __future__ import annotations

from typing import Any

from qdelta_jax.model import QDeltaConfig

VARIANTS: dict[str, dict[str, Any]] = {
    "qdelta": dict(label="Q-Delta (learned lam)", fixed_lam=None, use_decay=True),
    "gdn": dict(label="Gated DeltaNet (lam = 0)", fixed_lam=0.0, use_decay=True),
    "lam0.5": dict(label="fixed lam = 0.5", fixed_lam=0.5, use_decay=True),
    "deltanet": dict(label="DeltaNet (lam = 0, no decay)", fixed_lam=0.0, use_decay=False),
    "qdelta-neg": dict(label="Q-Delta, allow_neg_eigval", fixed_lam=None, use_decay=True,
                       allow_neg_eigval=True),
}
DEFAULT_VARIANTS = ("qdelta", "gdn", "lam0.5", "deltanet")

# The chunked "xla" path on every backend: it compiles quickly, and the experiment's many small
# programs are compiled within its time budget.
DEFAULT_IMPLEMENTATION = "xla"


def _round_up(n: int, m: int) -> int:
    return m * ((n + m - 1) // m)


def model_config(prof, variant: str, vocab: int, implementation: str | None) -> QDeltaConfig:
    """The model of ``variant`` sized by the profile ``prof`` for a task of ``vocab`` tokens
    (rounded up to a multiple of 64)."""
    v = VARIANTS[variant]
    return QDeltaConfig(
        vocab_size=_round_up(vocab, 64), hidden_size=prof.hidden_size,
        num_hidden_layers=prof.num_layers, num_heads=prof.num_heads, head_dim=prof.head_dim,
        chunk_size=prof.chunk_size, implementation=implementation, fixed_lam=v["fixed_lam"],
        use_decay=v["use_decay"], allow_neg_eigval=v.get("allow_neg_eigval", False),
    )
