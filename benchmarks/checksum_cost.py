"""Time of the checkpoint checksums (``qdelta_jax.train.checkpoint.checksums``) on a preset's whole
train state (params and AdamW moments, vocabulary 32000): the time each checkpoint save adds.

    python benchmarks/checksum_cost.py --preset 340m
"""

from __future__ import annotations

import argparse
import time

import jax


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
    ckpt.checksums(state)  # compile
    times = []
    for _ in range(a.reps):
        t = time.perf_counter()
        ckpt.checksums(state)
        times.append(time.perf_counter() - t)
    best = min(times)
    print(f"{a.preset}: {n / 1e6:.1f}M state elements on {jax.device_count()} x "
          f"{jax.devices()[0].device_kind}: checksums {best * 1e3:.1f} ms "
          f"({n * 4 / best / 1e9:.1f} GB/s of float32)")


if __name__ == "__main__":
    main()
