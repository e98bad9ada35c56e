"""The performance report: training images/s of every configuration, measured side by side in one
process: ``python -m benchmarks.benchmark``.

For each model × batch size it times bn_jax's step for each train mode, precision, loop (``step``:
one jitted call per step; ``fused``: all timed steps in one compiled ``fori_loop``) and device
count, and, when PyTorch is installed, the blog post's PyTorch loop (``freezeOthers`` after each
step; benchmarks/torch_reference.py) eager and under ``torch.compile``, on the same device, model
shape and batch. Every configuration is compiled and warmed up, then timed in interleaved rounds
so that machine noise hits all alike; the median round is reported. Beside each measurement is a
roofline limit for this device (bn_jax/roofline.py) and the fraction of it reached.

Writes ``<out>/benchmark.json`` (every row, the device, versions and the command),
``<out>/benchmark.md`` (the table) and ``<out>/benchmark.png`` (a bar chart). On a CPU,
``--simulate_cpu_devices 8 --num_devices 1,2,4,8`` checks that the sharded program scales
correctly (all simulated devices share the same cores, so it is no speed claim).

``--input_pipeline DIR|generate`` reports on the streamed ImageNet input instead: decoded and
augmented images/s (RandomResizedCrop + flip, bn_jax.streaming's training path) in this process
and in grain worker processes, per CPU core; whether that keeps up with the BN-only ImageNet
ResNet step timed on this device; and an estimate (never a measurement) of the CPU cores an
H100 would need, from XLA's FLOP count of that step, the H100's published peak and an assumed
utilisation. ``generate`` writes a temporary folder of ImageNet-sized synthetic JPEGs; a real
ImageNet folder (train/<wnid>/*.JPEG, val/<wnid>/*.JPEG) measures the real thing.
"""

import argparse
import dataclasses
import os
import sys
import time
from typing import Any, Callable, Dict, List, Optional

from tqdm import tqdm

from benchmarks.report import (Case, comparisons, format_table, make_row, positive_ints, report_header, split,
                               time_rounds, unwritable, write_report)


def build_parser():
    from bn_jax.config import HelpFormatter  # (no JAX: --help answers at once)
    p = argparse.ArgumentParser(prog="python -m benchmarks.benchmark", description=__doc__,
                                formatter_class=HelpFormatter)
    p.add_argument("--models", default="resnet20", help="comma-separated architectures, as for experiments.cifar")
    p.add_argument("--width", type=int, default=1, help="width multiplier")
    p.add_argument("--batch_sizes", default="128", help="comma-separated global images per step")
    p.add_argument("--modes", default="full,bn", help="comma-separated bn_jax train modes")
    p.add_argument("--precisions", default="float32,bfloat16", help="comma-separated compute precisions")
    p.add_argument("--loops", default="step,fused", help="comma-separated training loops (step, fused)")
    p.add_argument("--num_devices", default="all",
                   help="comma-separated device counts to run the sharded step on, or 'all'")
    p.add_argument("--unsharded", action="store_true",
                   help="also time the plain single-device step (no mesh), to measure sharding overhead")
    p.add_argument("--simulate_cpu_devices", type=int, default=None,
                   help="split the CPU into this many XLA devices (set before JAX starts)")
    p.add_argument("--torch", default="eager,compile,expert",
                   help="PyTorch baselines (CIFAR ResNets, modes bn and full), comma-separated, or 'none': the "
                        "blog's loop eager and compiled (float32); an expert's loop (benchmarks/torch_reference.py; "
                        "each of --precisions) expert, expert_graph (a CUDA graph) or expert_compile")
    p.add_argument("--pack", default=None, metavar="K,K,...",
                   help="also time K runs trained as one pack (bn_jax.pack: one compiled step for all), for each "
                        "K, with per-seed initial weights (grouped convolutions) and with shared ones (one "
                        "convolution over the members' joined batch); images/s are the pack's, all members")
    p.add_argument("--pack_members", default="auto", help="comma-separated ways a pack's step trains its "
                   "members (auto, vmap, sequential; see experiments.cifar --help), each timed")
    p.add_argument("--steps", type=int, default=10, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds per configuration")
    p.add_argument("--warmup", type=int, default=2, help="PyTorch's untimed steps (>= 2 for torch bn: its step 2 "
                                                         "recompiles); bn_jax warms up with one call of --steps")
    p.add_argument("--no_limits", dest="limits", action="store_false",
                   help="skip measuring the device's peaks and the roofline columns")
    p.add_argument("--out", default="runs/benchmark", help="folder for benchmark.json/.md/.png")
    g = p.add_argument_group(
        "input pipeline (streamed ImageNet)",
        "--input_pipeline replaces the step table by the input-pipeline report; --rounds applies to the "
        "pipeline and the step, --steps, --warmup and --precisions to the step")
    g.add_argument("--input_pipeline", metavar="DIR|generate", default=None,
                   help="time decoding + RandomResizedCrop + flip of an ImageNet folder (train/<wnid>/*.JPEG and "
                        "val/<wnid>/*.JPEG), or of a temporary folder of generated JPEGs of ImageNet's typical size "
                        "(about 400×350 pixels and 110 KB)")
    g.add_argument("--input_workers", default="0,cores",
                   help="comma-separated grain worker-process counts to time (0: in this process; cores: "
                        "os.cpu_count()); the largest is the 'all cores' configuration the verdicts use")
    g.add_argument("--input_batches", type=int, default=None,
                   help="host batches per timed round of the pipeline (default: 10× what grain holds in flight, "
                        "16 per reading process + 2 per worker, so that its bursts barely move a round), after "
                        "a warm-up of that in-flight work")
    g.add_argument("--input_batch_size", type=int, default=16, help="host batch of the pipeline and of the step")
    g.add_argument("--input_model", default="resnet50", help="ImageNet ResNet whose BN-only step is timed "
                                                             "(resnet18, 34, 50, 101, 152, 200)")
    g.add_argument("--input_image_size", type=int, default=224,
                   help="crop side (224 is ImageNet's; smaller only for quick looks and tests)")
    g.add_argument("--generate_images", type=int, default=256,
                   help="generate: training JPEGs to write (the stream cycles over them)")
    g.add_argument("--h100_mfu", type=float, default=0.4,
                   help="assumed H100 utilisation (achieved / peak dense FLOP/s) for the estimated cores")
    return p


def validate_cases(args) -> Optional[str]:
    """The first problem with the requested models, modes, precisions or loops, or None."""
    from bn_jax.config import ExperimentConfig
    for flag in ("models", "modes", "precisions", "loops"):
        if not split(getattr(args, flag)):
            return f"--{flag} names nothing (got {getattr(args, flag)!r}): nothing would be timed"
    for loop in split(args.loops):
        if loop not in ("step", "fused"):
            return f"--loops: unknown loop {loop!r}; use step, fused"
    for model in split(args.models):
        for mode in split(args.modes):
            for precision in split(args.precisions):
                try:
                    ExperimentConfig(model=model, width=args.width, train_mode=mode, precision=precision).validate()
                except (ValueError, KeyError) as e:
                    return f"{model} {mode} {precision}: {e}"
    return None


def jax_cases(args, device_counts) -> List[Case]:
    counts = device_counts + ([None] if args.unsharded else [])
    packs = [(None, "seed", "auto")] + [(k, init, how) for k in (positive_ints(args.pack, "--pack") if args.pack else [])
                                        for init in ("seed", "shared") for how in split(args.pack_members)]
    return [Case("bn_jax", m, b, mode, prec, loop, n, k, init, how)
            for m in split(args.models) for b in map(int, split(args.batch_sizes))
            for mode in split(args.modes) for prec in split(args.precisions)
            for loop in split(args.loops) for n in counts for k, init, how in packs]


# the blog's loop (eager, compile) and an expert's (benchmarks/torch_reference.py)
TORCH_VARIANTS = ("eager", "compile", "expert", "expert_graph", "expert_compile")
EXPERT = {"expert": "eager", "expert_graph": "graph", "expert_compile": "compile"}


def torch_variants(value: str) -> List[str]:
    variants = [] if value == "none" else split(value)
    unknown = [v for v in variants if v not in TORCH_VARIANTS]
    if unknown:
        raise ValueError(f"--torch: unknown {', '.join(unknown)}; use {', '.join(TORCH_VARIANTS)} or none")
    return variants


def torch_cases(args) -> List[Case]:
    from benchmarks import torch_reference
    variants = torch_variants(args.torch)
    if not variants:
        return []
    if not torch_reference.available():
        print("PyTorch is not installed: no PyTorch rows (pip install -e '.[torch]')", file=sys.stderr)
        return []
    out = []
    for m in split(args.models):
        try:
            torch_reference.blocks_per_segment(m)
        except ValueError:
            continue  # the reference builds CIFAR ResNets only
        out += [Case("torch", m, b, mode, prec, v, 1) for b in map(int, split(args.batch_sizes))
                for mode in split(args.modes) if mode in ("bn", "full") for v in variants
                for prec in (split(args.precisions) if v in EXPERT else ["float32"])]
    return out


@dataclasses.dataclass
class JaxRunner:
    run: Callable[[int], None]  # n (<= steps) training steps on the device, then wait
    cost: Callable[[], Dict[str, float]]  # XLA's cost analysis of one step
    compile_s: float  # fused: the XLA compile of the loop program; step: the first call (compile + 1 step)
    executable: Any = None  # fused: the compiled loop (its optimized HLO: ``executable.as_text()``)
    state: Callable[[], Any] = None  # the train state the steps so far have reached


def jax_runner(case: Case, width: int, steps: int) -> JaxRunner:
    """Compiles bn_jax's training program for ``case`` on a random device-resident dataset.

    The fused loop has a static length, so it is compiled ahead of time for calls of ``steps``
    steps (``run(k)`` with another k compiles again, on its first call), and its cost analysis
    is taken from that same executable (XLA counts a loop body once, so that is one step's cost); the step
    loop compiles on its first call and ``cost`` compiles one single step for the analysis.
    """
    import jax
    from bn_jax import datasets, parallel, roofline, train
    from bn_jax import program as program_lib
    from bn_jax.config import ExperimentConfig, RuntimeConfig

    config = ExperimentConfig(model=case.model, width=width, train_mode=case.mode, batch_size=case.batch_size,
                              precision=case.precision).validate()
    mesh = None if case.devices is None else parallel.make_mesh(case.devices)
    if mesh is not None:
        parallel.check_batch_size(case.batch_size, mesh)
    data = datasets.random_dataset(case.batch_size * steps, 1)
    if case.pack:
        program, state = pack_program(case, config, data, mesh, steps)
    else:
        program = program_lib.build_program(config, RuntimeConfig(loop=case.loop), data, mesh)
        state = train.create_train_state(config, 10, (32, 32, 3), steps_per_epoch=steps)
    holder = {"state": program.put(state), "totals": program.zero_totals()}
    fused = program.loop == "fused"
    t = time.perf_counter()
    if fused:
        compiled = program.compile(holder["state"], holder["totals"], stop=steps)
    compiled_at = time.perf_counter()

    def run(k: int):
        s, t = holder["state"], holder["totals"]
        for i in [0] if fused else range(k):
            s, t = program.run(s, t, 0, i, k if fused else i + 1)
        jax.block_until_ready(s)
        holder["state"], holder["totals"] = s, t

    if not fused:
        run(1)

    def cost():
        return roofline.step_cost(compiled if fused else program.compile(holder["state"], holder["totals"]))

    return JaxRunner(run, cost, time.perf_counter() - t if not fused else compiled_at - t,
                     compiled if fused else None, lambda: holder["state"])


def pack_program(case: Case, config, data, mesh, steps: int):
    """(program, packed state) of ``case.pack`` members of ``config``: seeds 0…K-1, each with its own
    initial weights, or all starting from seed 0's (``init == "shared"``)."""
    from bn_jax import pack
    from bn_jax.config import RuntimeConfig
    members = [dataclasses.replace(config, seed=s, init_seed=0 if case.init == "shared" else None)
               for s in range(case.pack)]
    p = pack.Pack(members, 10, (32, 32, 3), steps, case.members)
    return pack.PackProgram(p, RuntimeConfig(loop=case.loop), data, mesh), p.initial_state()


def cost_key(case: Case):
    return case.model, case.batch_size, case.mode, case.precision, case.devices, case.pack, case.init


def torch_runner(case: Case, width: int):
    from benchmarks import torch_reference
    device = "cuda" if _jax_platform() == "gpu" else "cpu"
    if case.loop in EXPERT:
        run = torch_reference.make_expert_runner(case.model, width, case.batch_size, case.mode, EXPERT[case.loop],
                                                 case.precision == "bfloat16", device)
    else:
        run = torch_reference.make_runner(case.model, width, case.batch_size, case.mode, case.loop == "compile",
                                          device=device)
    return lambda n: run(n)


def _jax_platform() -> str:
    import jax
    return jax.devices()[0].platform


def check_flags(parser, args) -> Optional[List[int]]:
    """Every flag's problem exits 2 before anything is compiled; the device counts asked for."""
    try:
        torch_variants(args.torch)
        counts = None if args.num_devices == "all" else positive_ints(args.num_devices, "--num_devices")
        positive_ints(args.batch_sizes, "--batch_sizes")
        if args.pack is not None:
            positive_ints(args.pack, "--pack")
        unknown = [m for m in split(args.pack_members) if m not in ("auto", "vmap", "sequential")]
        if unknown:
            raise ValueError(f"--pack_members: unknown {', '.join(unknown)}; use auto, vmap, sequential")
    except ValueError as e:
        parser.error(str(e))
    if args.warmup < 0 or args.steps < 1 or args.rounds < 1:
        parser.error("--steps and --rounds must be >= 1 and --warmup >= 0")
    return counts


def prepare(cases: List[Case], args):
    """(runners by case name, XLA costs by cost_key, skipped case names): each case compiled and
    warmed up; a case that fails (out of memory, a failed torch.compile) is reported and skipped."""
    runners, costs, skipped = {}, {}, []
    for case in tqdm(cases, desc="compiling", leave=False):
        t = time.perf_counter()
        try:
            if case.framework == "bn_jax":
                runner = jax_runner(case, args.width, max(args.steps, args.warmup, 1))
                runners[case.name] = runner.run
                if args.limits and cost_key(case) not in costs:  # the same step whatever the loop
                    costs[cost_key(case)] = runner.cost()
                # one untimed call of the timed length: the fused loop is compiled for that length only
                runners[case.name](args.steps)
            else:
                runners[case.name] = torch_runner(case, args.width)
                runners[case.name](1)
                runners[case.name](args.warmup)
        except Exception as e:  # noqa: BLE001  (report it, time the rest)
            tqdm.write(f"{case.name}: skipped, {type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}")
            runners.pop(case.name, None)
            skipped.append(case.name)
            continue
        tqdm.write(f"{case.name}: ready in {time.perf_counter() - t:.1f}s")
    return runners, costs, skipped


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    counts = check_flags(parser, args)
    if args.input_pipeline is not None:
        from benchmarks import input_benchmark
        return input_benchmark.input_main(parser, args, argv)
    problem = validate_cases(args) or unwritable(args.out)
    if problem:  # before anything is compiled or timed
        parser.error(problem)
    if torch_variants(args.torch):  # JAX would otherwise take 75% of GPU memory before PyTorch's rows run
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    if args.simulate_cpu_devices:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_force_host_platform_device_count={args.simulate_cpu_devices}")
    import jax
    from bn_jax import models, roofline

    if counts and max(counts) > len(jax.devices()):
        parser.error(f"--num_devices {max(counts)} exceeds the {len(jax.devices())} visible device(s)"
                     + ("" if args.simulate_cpu_devices else "; on a CPU, --simulate_cpu_devices N splits it"))
    cases = jax_cases(args, counts or [len(jax.devices())]) + torch_cases(args)
    runners, costs, skipped = prepare(cases, args)
    if not runners:
        print(f"error: every case failed to prepare ({', '.join(skipped)}); nothing to time", file=sys.stderr)
        return 1
    peaks = {p: roofline.measure_peaks(models.PRECISIONS[p]) for p in sorted({c.precision for c in cases})
             if args.limits}
    device = jax.devices()[0]

    def write(times, done: int):
        rows = [make_row(case, times[case.name], costs.get(cost_key(case)) if case.framework == "bn_jax" else None,
                         peaks.get(case.precision))
                for case in cases if case.name in runners]
        comps = comparisons(rows)
        report = {**report_header(argv), "steps": args.steps, "rounds": args.rounds, "rounds_done": done,
                  "width": args.width, "peaks": {p: dataclasses.asdict(v) for p, v in peaks.items()},
                  "rows": rows, "comparisons": comps, "skipped": skipped}
        title = (f"{device.platform} ({device.device_kind}), median of {done} rounds × {args.steps} steps"
                 f"{'' if done == args.rounds else f' ({done} of {args.rounds} rounds so far)'}, {report['date']}")
        write_report(args.out, report, f"{title}\n\n`{report['command']}`\n\n{format_table(rows, comps)}\n", rows,
                     title)

    time_rounds(runners, args.steps, args.rounds, on_round=write)  # the report is rewritten after every round


if __name__ == "__main__":
    main()
