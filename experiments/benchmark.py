"""Train-step throughput per train mode on the current device: ``python -m experiments.benchmark``.

A benchmark, not a test: each mode's jitted step is compiled and warmed up, then timed in
interleaved rounds (full, bn, full, bn, ...) so that machine noise hits every mode alike; the
median round is reported, with each mode's step time as a ratio of the first mode's.
"""

import argparse
import statistics
import time

import jax
import numpy as np

from bn_jax import input_pipeline, train, train_modes
from bn_jax.config import Config


def build_parser():
    p = argparse.ArgumentParser(prog="python -m experiments.benchmark", description=__doc__,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="resnet20", help="architecture, as for experiments.cifar")
    p.add_argument("--width", type=int, default=1, help="width multiplier")
    p.add_argument("--batch_size", type=int, default=128, help="images per step")
    p.add_argument("--modes", default="full,bn", help="comma-separated train modes; ratios are to the first")
    p.add_argument("--steps", type=int, default=10, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds per mode")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps after compilation")
    return p


def make_runner(config: Config, batch_size: int):
    """A closure that runs n train steps on one fixed random batch and waits for them."""
    state = train.create_train_state(config, 10, (32, 32, 3), steps_per_epoch=1000)
    rng = np.random.default_rng(0)
    images = jax.device_put(rng.integers(0, 256, (batch_size, 32, 32, 3), dtype=np.uint8))
    labels = jax.device_put(rng.integers(0, 10, batch_size).astype(np.int32))
    mean, std = input_pipeline.channel_stats(np.asarray(images))
    step = train.jit_train_step(augment=True)
    key = jax.random.key(0)
    holder = [state]

    def run(n):
        s = holder[0]
        for i in range(n):
            s, m = step(s, images, labels, jax.random.fold_in(key, i), mean, std)
        jax.block_until_ready((s, m))
        holder[0] = s

    return run, state


def main(argv=None):
    args = build_parser().parse_args(argv)
    modes = args.modes.split(",")
    for mode in modes:
        train_modes.check_mode(mode)
    runners, times = {}, {m: [] for m in modes}
    for mode in modes:
        config = Config(model=args.model, width=args.width, train_mode=mode, batch_size=args.batch_size)
        runners[mode], state = make_runner(config.validate(), args.batch_size)
        t = time.perf_counter()
        runners[mode](1)
        print(f"{mode}: compiled in {time.perf_counter() - t:.1f}s, "
              f"{train_modes.describe(state.params, mode)}")
        runners[mode](args.warmup)
    for _ in range(args.rounds):
        for mode in modes:
            t = time.perf_counter()
            runners[mode](args.steps)
            times[mode].append((time.perf_counter() - t) / args.steps)
    device = jax.devices()[0]
    print(f"\n{args.model} ×{args.width}, batch {args.batch_size}, {device.platform} ({device.device_kind}), "
          f"median of {args.rounds} rounds × {args.steps} steps")
    print(f"{'mode':<12}{'ms/step':>10}{'images/s':>12}{'time ratio':>12}")
    base = statistics.median(times[modes[0]])
    for mode in modes:
        t = statistics.median(times[mode])
        print(f"{mode:<12}{1000 * t:>10.1f}{args.batch_size / t:>12.0f}{t / base:>12.2f}")


if __name__ == "__main__":
    main()
