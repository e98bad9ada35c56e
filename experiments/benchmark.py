"""Train-step throughput per train mode and device count: ``python -m experiments.benchmark``.

A benchmark, not a test: each (mode, device count) jitted step is compiled and warmed up, then
timed in interleaved rounds so that machine noise hits every configuration alike; the median
round is reported, with step time as a ratio of the first configuration's. On a CPU,
``--simulate_cpu_devices 8 --num_devices 1,2,4,8`` shows that the sharded program scales
correctly (all simulated devices share the same cores, so it is no speed claim).
"""

import argparse
import os
import statistics
import time


def build_parser():
    p = argparse.ArgumentParser(prog="python -m experiments.benchmark", description=__doc__,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="resnet20", help="architecture, as for experiments.cifar")
    p.add_argument("--width", type=int, default=1, help="width multiplier")
    p.add_argument("--batch_size", type=int, default=128, help="global images per step")
    p.add_argument("--modes", default="full,bn", help="comma-separated train modes; ratios are to the first")
    p.add_argument("--num_devices", default="all",
                   help="comma-separated device counts to run the sharded step on, or 'all'")
    p.add_argument("--unsharded", action="store_true",
                   help="also time the plain single-device step (no mesh), to measure sharding overhead")
    p.add_argument("--simulate_cpu_devices", type=int, default=None,
                   help="split the CPU into this many XLA devices (set before JAX starts)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds per configuration")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps after compilation")
    return p


def make_runner(config, batch_size: int, mesh):
    """A closure that runs n train steps on one fixed random batch and waits for them."""
    import jax
    import numpy as np
    from bn_jax import input_pipeline, parallel, train

    state = train.create_train_state(config, 10, (32, 32, 3), steps_per_epoch=1000)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (batch_size, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, batch_size).astype(np.int32)
    mean, std = input_pipeline.channel_stats(images)
    if mesh is None:
        images, labels = jax.device_put((images, labels))
    else:
        state = parallel.replicate(state, mesh)
        images, labels = parallel.shard_global(images, mesh), parallel.shard_global(labels, mesh)
    step = train.jit_train_step(True, mesh)
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
    if args.simulate_cpu_devices:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_force_host_platform_device_count={args.simulate_cpu_devices}")
    import jax
    from bn_jax import parallel, train_modes
    from bn_jax.config import Config

    modes = args.modes.split(",")
    counts = [len(jax.devices())] if args.num_devices == "all" else [int(n) for n in args.num_devices.split(",")]
    configs = [(mode, n) for mode in modes for n in counts] + \
              ([(mode, None) for mode in modes] if args.unsharded else [])
    runners = {}
    for mode, n in configs:
        config = Config(model=args.model, width=args.width, train_mode=mode, batch_size=args.batch_size).validate()
        mesh = None if n is None else parallel.make_mesh(n)
        if mesh is not None:
            parallel.check_batch_size(args.batch_size, mesh)
        runners[mode, n], state = make_runner(config, args.batch_size, mesh)
        t = time.perf_counter()
        runners[mode, n](1)
        print(f"{mode} on {n or 'unsharded'}: compiled in {time.perf_counter() - t:.1f}s, "
              f"{train_modes.describe(state.params, mode)}", flush=True)
        runners[mode, n](args.warmup)
    times = {c: [] for c in configs}
    for _ in range(args.rounds):
        for c in configs:
            t = time.perf_counter()
            runners[c](args.steps)
            times[c].append((time.perf_counter() - t) / args.steps)
    device = jax.devices()[0]
    print(f"\n{args.model} ×{args.width}, global batch {args.batch_size}, {device.platform} "
          f"({device.device_kind}), median of {args.rounds} rounds × {args.steps} steps")
    print(f"{'mode':<12}{'devices':>10}{'ms/step':>10}{'images/s':>12}{'time ratio':>12}")
    base = statistics.median(times[configs[0]])
    for mode, n in configs:
        t = statistics.median(times[mode, n])
        print(f"{mode:<12}{n or 'unsharded':>10}{1000 * t:>10.1f}{args.batch_size / t:>12.0f}{t / base:>12.2f}")


if __name__ == "__main__":
    main()
