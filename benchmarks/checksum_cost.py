"""Time of the checkpoint checksums (``qdelta_jax.train.checkpoint.checksums``) on a preset's whole
train state (params and AdamW moments, vocabulary 32000): the time each checkpoint save adds.

    python benchmarks/checksum_cost.py --preset 340m
"""

from __future__ import annotations

import argparse

import jax

from qdelta_jax.testing import time_fn


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="340m")
    p.add_argument("--reps", type=int, default=5)
    a = p.parse_args()

    from qdelta_jax.train import checkpoint as ckpt
    from qdelta_jax.train import sharding as shd
    from qdelta_jax.train import trainer

    args = trainer.TrainArgs(preset=a.preset, task="mqar", batch_size=jax.device_count())
    cfg = trainer.model_config_for(args, 32000, True)
    sess = trainer.Session(args, cfg, shd.make_mesh(None))
    state = sess.init_state().to_dict()
    n = sum(x.size for x in jax.tree.leaves(state))
    ms = time_fn(ckpt.checksums, (state,), warmup=1, reps=a.reps)  # the warm-up compiles
    print(f"{a.preset}: {n / 1e6:.1f}M state elements on {jax.device_count()} x "
          f"{jax.devices()[0].device_kind}: checksums {ms:.1f} ms median "
          f"({n * 4 / ms / 1e6:.1f} GB/s of float32)")


if __name__ == "__main__":
    main()
