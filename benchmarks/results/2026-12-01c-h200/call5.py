# c/call 5: the 340M layer with the old and the new default config (the old one recorded
# through the config cache, which get_config reads first), one process each, same card.
import dataclasses
import subprocess
import sys

import jax.numpy as jnp

from qdelta_jax.pallas import config as c

new = c.default_config(128, 256, 64, jnp.bfloat16)
old = dataclasses.replace(new, grads=dataclasses.replace(new.grads, block_v=64),
                          grads_k=dataclasses.replace(new.grads_k, num_warps=8),
                          dd0=dataclasses.replace(new.dd0, num_stages=1))
print("new", new, "\nold", old, flush=True)
for name, cfg in (("old", old), ("new", new)):
    if c.CACHE_FILE.exists():
        c.CACHE_FILE.unlink()
    if cfg is old:
        c.remember(128, 256, 64, jnp.bfloat16, cfg, persist=True)
    r = subprocess.run([sys.executable, "benchmarks/ops.py", "--shapes", "8x4096x6x128x256",
                        "--impl", "pallas-triton", "--reps", "30", "--warmup", "5"],
                       capture_output=True, text=True, timeout=70)
    rows = [line for line in r.stdout.splitlines() if line.startswith("|")]
    print("==", name, "\n", "\n".join(rows), flush=True)
