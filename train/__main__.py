"""``python -m qdelta_jax.train`` runs ``qdelta-train``."""

import sys

from qdelta_jax.train.cli import main

sys.exit(main())
