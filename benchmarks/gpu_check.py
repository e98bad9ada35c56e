"""The whole accelerator check as one command: ``python -m benchmarks.gpu_check --out DIR``.

GPU time is rare and short, so everything only an accelerator can show is prepared commands
that spend their minutes measuring. Stages, in order of priority, within ``--budget_s``:

1. ``environment``: versions, device kind and memory;
2. ``correctness`` on this backend: the fused loop equals the step loop over a few steps of a small
   ResNet; frozen leaves are bit-identical after BN-only steps; the compiled BN-only step has
   fewer convolutions than the full step;
3. ``setup``: seconds from a fresh process to a compiled step, cold and warm compilation cache,
   with the default and the GPU-kernel threefry lowering, and whether both draw the same leaves
   (``benchmarks.setup_time``);
4. ``single``: one ResNet-110 run at batch 128 (BN-only float32 and bfloat16, full float32), the
   fused loop of static length, compile time apart from step time, each with its roofline limit;
5. ``xla_flags``: the same BN-only step under XLA options, a process each (``benchmarks.xla_flags``);
6. ``torch``: the blog's PyTorch loop and an expert's (``benchmarks.torch_reference``);
7. ``packs``: packs of K = 1, 2, 4, 8 runs, then 8 with shared weights and 8 in bfloat16;
8. ``batch_sweep``: BN-only float32 at batches 256…1024, outside the paper's recipe;
9. ``run``, a call of its own (``--stages run``): the paper's 160-epoch BN-only ResNet-110 run on
   the budget left. At the deadline it stops through the trainer's own preemption path
   (checkpoint, then exit), and its workdir, with small checkpoints, is packed into DIR so a
   later job resumes it (``--resume_run``).

The default ``--stages measure`` is stages 1–8; ``all`` adds the run. ``campaign`` (only when
named) trains the runs of ``docs/results/campaign.json`` in order until the deadline and packs
them into DIR/campaign.tar.gz, from which the next call goes on (``--resume_campaign``).

DIR receives at most six files, each rewritten as soon as there is something new, so a kill at
any moment keeps what was measured: ``gpu_check.json`` (everything), ``gpu_check.md`` (the report),
``gpu_check.log``, ``throughput.png``, ``run.tar.gz`` and ``campaign.tar.gz``. ``--smoke`` runs the same code at tiny
sizes on generated data, on any device: CI runs it on CPU.

Exit codes: 0 no check failed and nothing raised; 1 a check failed, or a stage or a throughput
case raised (the report names it); 2 bad flags or missing data; 75 stopped by SIGTERM/SIGINT
(what was measured is written, the run packed); 130 a second SIGINT.
"""

import argparse
import contextlib
import dataclasses
import datetime
import functools
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import traceback
from typing import Any, Dict, List, Optional, Tuple

from benchmarks import benchmark
from benchmarks import report as report_lib

STAGES = ("environment", "correctness", "setup", "single", "xla_flags", "torch", "packs", "batch_sweep", "run",
          "campaign")
MEASURE = STAGES[:-2]  # the first call's stages; the run, which needs a call of its own, is the second
STAGE_GROUPS = {"measure": MEASURE, "all": STAGES[:-1]}  # (the campaign only when named: it trains for hours)
TIMED = ("single", "torch", "packs", "batch_sweep")  # stages whose rows join the throughput table
FILES = ("gpu_check.json", "gpu_check.md", "gpu_check.log", "throughput.png", "run.tar.gz", "campaign.tar.gz")
DEFAULT_DATA = os.path.join("data", "cifar10-jpg.tar.gz")  # git-ignored; see docs/gpu_check.md
TARGETS_DOC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "performance.md")
_TARGET = re.compile(r"`(\w+)` (≥|>|≤) ([\d.]+)")
TARGET_KEYS = ("bn_over_torch_eager", "bn_over_torch_compile", "bn_over_full_time", "run_160_epochs_s",
               "pack8_over_solo", "pack8_images_per_second", "pack8_bf16_images_per_second",
               "bn_ms_per_step", "bn_bf16_ms_per_step", "bn_over_torch_expert", "bn_bf16_over_torch_expert_bf16",
               "pack8_over_torch_expert", "setup_s")
PACK = 8  # the pack size the GPU targets name


def read_targets(path: str = TARGETS_DOC) -> Dict[str, Tuple[str, float]]:
    """{key: (op, value)} of the GPU targets, from the one place they are written: the "checked
    as" column of docs/performance.md's "Targets" table. ValueError naming a key it lacks."""
    with open(path) as f:
        text = f.read()
    section = text.split("\n## Targets", 1)[-1].split("\n## ", 1)[0]
    found = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        match = _TARGET.fullmatch(cells[-1]) if len(cells) >= 3 else None
        if match:
            found[match.group(1)] = (match.group(2), float(match.group(3)))
    missing = [k for k in TARGET_KEYS if k not in found]
    if missing:
        raise ValueError(f"{path}: the Targets table lacks {', '.join(missing)}")
    return found


@dataclasses.dataclass(frozen=True)
class Sizes:
    """How big each stage is; ``SMOKE`` shrinks every one so the same code runs in seconds on CPU."""
    check_model: str = "resnet8"
    check_batch: int = 32
    check_steps: int = 6  # one epoch of the correctness runs, in fused calls of check_steps - 2
    model: str = "resnet110"
    batch_size: int = 128
    steps: int = 50  # timed steps per round
    rounds: int = 5
    warmup: int = 3  # untimed steps after compiling (torch bn: step 2 recompiles)
    epochs: int = 160
    min_case_s: float = 40.0  # a throughput case starts only with this much budget left
    min_run_s: float = 45.0  # likewise the run
    pack_s: float = 15.0  # kept back at the end to checkpoint and pack the run
    pack: int = PACK  # runs in each throughput case of packs
    packs: Tuple[int, ...] = (1, 2, 4, PACK)  # pack sizes of the packs stage
    sweep_batches: Tuple[int, ...] = (256, 512, 1024)  # the batch sweep (beyond the paper's 128)
    setup_timeout_s: float = 150.0  # per set-up process
    min_compile_case_s: float = 180.0  # a torch.compile row starts only with this much budget left
    flag_timeout_s: float = 120.0  # per XLA-flag process
    flag_steps: int = 50  # timed steps per round of an XLA-flag row (2 rounds)


FULL = Sizes()
SMOKE = Sizes(check_batch=8, check_steps=3, model="resnet8", batch_size=16, steps=2, rounds=2, warmup=2,
              epochs=3, min_case_s=0.0, min_run_s=0.0, pack_s=0.0, pack=2, packs=(1, 2), sweep_batches=(32,),
              flag_steps=2, min_compile_case_s=0.0)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for the results (at most six files)")
    p.add_argument("--budget_s", type=float, default=480.0,
                   help="seconds the whole check may take, start-up included (default 480)")
    p.add_argument("--data_dir", default=None,
                   help=f"CIFAR-10 for the run stage: image-folder .tar.gz or folder (default {DEFAULT_DATA}; "
                        "--smoke generates a tiny one)")
    p.add_argument("--stages", default="measure",
                   help=f"comma-separated stages, in this order: {', '.join(STAGES)}; 'measure' is every stage "
                        "before the run (the default: the first GPU call), 'all' those and the run")
    p.add_argument("--torch", default="eager,compile,expert,expert_graph,expert_compile",
                   help="PyTorch baselines, comma-separated, or none: the blog's loop (eager, compile) and an "
                        "expert's (expert, expert_graph, expert_compile; float32 and bfloat16). Default: all")
    p.add_argument("--run_s", type=float, default=None,
                   help="give the run stage at most this many seconds (default: all the budget left); "
                        "0 stops it after its first compiled call")
    p.add_argument("--workdir", default=None,
                   help="the run stage's workdir (default runs/gpu_check/<run name>); an earlier run "
                        "there is resumed")
    p.add_argument("--resume_run", default=None,
                   help="run.tar.gz from an earlier check: unpacked as --workdir, so the "
                        "160-epoch run continues where it stopped")
    p.add_argument("--campaign", default=None,
                   help="the campaign stage's list of runs (default docs/results/campaign.json)")
    p.add_argument("--resume_campaign", default=None,
                   help="campaign.tar.gz from an earlier check: its runs go on from their newest checkpoints")
    p.add_argument("--smoke", action="store_true",
                   help="tiny sizes and generated data: checks the command itself, on any device")
    return p


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    stages = [x for s in args.stages.split(",") if s for x in STAGE_GROUPS.get(s, (s,))]
    unknown = [s for s in stages if s not in STAGES]
    if unknown or not stages:
        parser.error(f"--stages: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(STAGES)}")
    args.stages = stages
    try:
        args.torch = benchmark.torch_variants(args.torch)
    except ValueError as e:
        parser.error(str(e))
    if not math.isfinite(args.budget_s) or args.budget_s <= 0:
        parser.error(f"--budget_s must be a positive number of seconds, got {args.budget_s}")
    if args.run_s is not None and (not math.isfinite(args.run_s) or args.run_s < 0):
        parser.error(f"--run_s must be >= 0 seconds, got {args.run_s}")
    if args.data_dir is None and not args.smoke:
        args.data_dir = DEFAULT_DATA
    if ("run" in stages or "campaign" in stages) and args.data_dir is not None and not os.path.exists(args.data_dir):
        parser.error(f"no data at {args.data_dir}: copy cifar10-jpg.tar.gz there (see docs/gpu_check.md), "
                     "pass --data_dir, or leave the run out with --stages")
    for flag, archive in (("--resume_run", args.resume_run), ("--resume_campaign", args.resume_campaign)):
        if archive is not None and not os.path.isfile(archive):
            parser.error(f"{flag}: no such file {archive}")
    for flag, archive in (("--resume_run", args.resume_run), ("--resume_campaign", args.resume_campaign)):
        if archive and os.path.dirname(os.path.abspath(archive)) == os.path.abspath(args.out):
            parser.error(f"{flag} {archive} lies in --out {args.out}, which the check empties first; "
                         "pass another --out")
        if archive and not tarfile.is_tarfile(archive):  # (before the budget is spent on other stages)
            parser.error(f"{flag}: {archive} is not a tar archive (the check's run.tar.gz or campaign.tar.gz)")
    if "campaign" in stages:
        from benchmarks import campaign
        try:
            args.campaign_runs = campaign.load(args.campaign or campaign.DEFAULT, *(
                (SMOKE.epochs, SMOKE.batch_size) if args.smoke else ()))
        except (OSError, ValueError, KeyError, TypeError) as e:
            parser.error(f"--campaign: {e}")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        parser.error(f"--out {args.out} is a file")
    return args


# ---- the report -----------------------------------------------------------------------------

def _finite(value):
    """JSON holds no NaN/Inf: they become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


class Report:
    """The check's results, rewritten to ``gpu_check.json`` and ``.md`` after every change."""

    def __init__(self, out: str, argv: List[str], budget_s: float, smoke: bool):
        self.out, self.start = out, time.time()
        os.makedirs(out, exist_ok=True)
        for name in FILES + tuple(f + ".tmp" for f in FILES):  # nothing of an earlier check stays
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(out, name))
        self.data: Dict[str, Any] = {
            "command": "python -m benchmarks.gpu_check " + " ".join(argv),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "host": platform.node(), "budget_s": budget_s, "smoke": smoke, "stages": {}}
        self._log = open(os.path.join(out, "gpu_check.log"), "w")

    def close(self) -> None:
        self._log.close()

    def elapsed(self) -> float:
        return time.time() - self.start

    def log(self, message: str) -> None:
        line = f"[{self.elapsed():6.1f}s] {message}"
        print(line, flush=True)
        self._log.write(line + "\n")
        self._log.flush()

    def update(self, stage: str, **values) -> None:
        self.data["stages"].setdefault(stage, {}).update(values)
        self.data["elapsed_s"] = self.elapsed()
        self.write()

    def write(self) -> None:
        from bn_jax import workdir as workdir_lib
        workdir_lib.write_atomic(os.path.join(self.out, "gpu_check.json"), json.dumps(_finite(self.data), indent=2))
        workdir_lib.write_atomic(os.path.join(self.out, "gpu_check.md"), render_markdown(self.data))

    def failures(self) -> List[str]:
        out = []
        for name, stage in self.data["stages"].items():
            if stage.get("error"):
                out.append(f"{name}: {stage['error']}")
            out += [f"{name}: {c['name']}" for c in stage.get("checks", []) if not c["passed"]]
            out += [f"{name}: {c['case']} failed" for c in stage.get("failed", [])]
            out += [f"{name}: {r['run']} {r['status']}" for r in stage.get("runs", [])
                    if str(r.get("status", "")).startswith("failed")]
        return out


class Clock:
    """The budget's deadline, counted from the start of the command."""

    def __init__(self, budget_s: float, start: float):
        self.deadline = start + budget_s

    def left(self) -> float:
        return self.deadline - time.time()


# ---- stage 1: environment -------------------------------------------------------------------

def environment() -> Dict[str, Any]:
    import jax

    from bn_jax import provenance

    device = jax.devices()[0]
    stats = {}
    with contextlib.suppress(Exception):  # not every backend reports memory
        stats = device.memory_stats() or {}
    return {"versions": provenance.versions(), "git": provenance.git_commit(), "platform": device.platform,
            "device_kind": device.device_kind, "device_count": jax.device_count(), "memory_bytes_limit": stats.get("bytes_limit"),
            "default_matmul_precision": str(jax.config.jax_default_matmul_precision),
            "nvidia_smi": _nvidia_smi(), "cpu_count": os.cpu_count()}


def _nvidia_smi() -> Optional[str]:
    if not shutil.which("nvidia-smi"):
        return None
    query = "name,memory.total,driver_version,clocks.max.sm,clocks.max.mem,power.limit"
    try:
        return subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv"], capture_output=True,
                              text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError) as e:
        return f"failed: {e}"


# ---- stage 2: correctness -------------------------------------------------------------------

def _check(name: str, passed: bool, **detail) -> Dict[str, Any]:
    return {"name": name, "passed": bool(passed), **detail}


def _relative_differences(a, b) -> Dict[str, float]:
    """‖a − b‖ / ‖b‖ per leaf, named by path."""
    import jax
    import numpy as np
    out = {}
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves(b)):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        out[jax.tree_util.keystr(path)] = float(np.linalg.norm(x - y) / max(np.linalg.norm(y), 1e-30))
    return out


def train_small(sizes: Sizes, workroot: str, loop: str, mode: str = "bn"):
    """(initial state, final state) of one epoch of the small ResNet, trained by the real trainer."""
    from bn_jax import checkpoints, datasets, train
    from bn_jax.config import ExperimentConfig, RuntimeConfig

    data = datasets.random_dataset(sizes.check_batch * sizes.check_steps, sizes.check_batch)
    config = ExperimentConfig(model=sizes.check_model, train_mode=mode, epochs=1, batch_size=sizes.check_batch,
                              lr=0.02, schedule="cosine", seed=3)
    runtime = RuntimeConfig(eval_batch_size=sizes.check_batch, loop=loop,
                            steps_per_call=max(1, sizes.check_steps - 2))  # two fused calls, one of them partial
    workdir = os.path.join(workroot, f"small_{mode}_{loop}")
    train.train_and_evaluate(config, workdir, data=data, log=lambda *a: None, runtime=runtime,
                             checkpoint_options=checkpoints.CheckpointOptions(keep=1, async_save=False))
    fresh = train.create_train_state(config, data.num_classes, data.train_images.shape[1:], sizes.check_steps)
    return fresh, checkpoints.restore(workdir, fresh)


def correctness(sizes: Sizes, workroot: str, report: Report) -> None:
    import jax
    import numpy as np
    from bn_jax import train_modes

    checks = []
    initial, fused = train_small(sizes, workroot, "fused")
    _, step = train_small(sizes, workroot, "step")
    diffs = _relative_differences({"params": fused.params, "batch_stats": fused.batch_stats},
                                  {"params": step.params, "batch_stats": step.batch_stats})
    worst = max(diffs, key=diffs.get)
    # Both loops trace the same step; only the compiled program around it differs. On a GPU,
    # float32 convolutions run as TF32 and XLA may pick other cuDNN algorithms per program, so
    # rounding differs; 1e-3 is TF32's scale (METHOD: ~3e-4 per product), far above rounding
    # of float32 and far below a wrong step (a different batch or key moves leaves by O(1)).
    bitwise = all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(
        jax.tree_util.tree_leaves(fused.params), jax.tree_util.tree_leaves(step.params)))
    checks.append(_check(f"fused loop equals step loop ({sizes.check_steps} steps of {sizes.check_model})",
                         diffs[worst] <= 1e-3 and int(fused.step) == int(step.step) == sizes.check_steps,
                         max_relative_difference=diffs[worst], worst_leaf=worst, bitwise_equal=bitwise,
                         tolerance=1e-3))
    report.update("correctness", checks=checks)

    mask = jax.tree_util.tree_leaves(train_modes.trainable_mask(train_modes.variables_of(initial), "bn"))
    pairs = list(zip(mask, jax.tree_util.tree_leaves(initial.params), jax.tree_util.tree_leaves(fused.params)))
    frozen_same = [np.array_equal(np.asarray(a), np.asarray(b)) for t, a, b in pairs if not t]
    trained_moved = [not np.array_equal(np.asarray(a), np.asarray(b)) for t, a, b in pairs if t]
    checks.append(_check("frozen leaves bit-identical after BN-only steps",
                         all(frozen_same) and all(trained_moved), frozen_leaves=len(frozen_same),
                         frozen_changed=frozen_same.count(False), trainable_leaves=len(trained_moved),
                         trainable_moved=sum(trained_moved)))
    report.update("correctness", checks=checks)

    checks.append(eval_in_one_call_check(sizes))
    report.update("correctness", checks=checks)
    checks.append(pack_member_check(sizes))
    report.update("correctness", checks=checks)

    counts = {mode: convolution_counts(sizes, mode) for mode in ("full", "bn")}
    total = {mode: sum(c.values()) for mode, c in counts.items()}
    checks.append(_check("compiled BN-only step has fewer convolutions than the full step",
                         total["bn"] < total["full"], convolutions=counts, totals=total))
    report.update("correctness", checks=checks, fused_cost_over_step_cost=fused_cost_ratio(sizes))


def eval_in_one_call_check(sizes: Sizes) -> Dict[str, Any]:
    """The fused program's evaluation (every test batch in one compiled scan) against one call per
    batch, on this backend: equal counts, and the loss equal (bitwise on CPU in float32; within
    1e-6 relative here, where TF32 and other cuDNN algorithms may round otherwise)."""
    from bn_jax import datasets, train
    from bn_jax import program as program_lib
    from bn_jax.config import ExperimentConfig, RuntimeConfig

    b = sizes.check_batch
    data = datasets.random_dataset(2 * b, 2 * b + b // 2)  # the last test batch padded
    config = ExperimentConfig(model=sizes.check_model, train_mode="bn", batch_size=b)
    program = program_lib.build_program(config, RuntimeConfig(loop="fused", eval_batch_size=b), data, mesh=None)
    state = program.put(train.create_train_state(config, 10, (32, 32, 3), steps_per_epoch=2))
    state, _ = program.run(state, program.zero_totals(), 0, 0, 2)
    one = program.evaluate(state)
    per_batch = program_lib.evaluate(state, program.test_batches, program.mean, program.std)
    loss_diff = abs(one["loss"] - per_batch["loss"]) / max(abs(per_batch["loss"]), 1e-30)
    return _check("evaluation in one call gives the metrics of one call per batch",
                  one["accuracy"] == per_batch["accuracy"] and one["top5_accuracy"] == per_batch["top5_accuracy"]
                  and loss_diff <= 1e-6, bitwise_equal=one == per_batch, loss_relative_difference=loss_diff,
                  test_batches=len(program.test_batches))


def pack_member_check(sizes: Sizes) -> Dict[str, Any]:
    """A pack of two BN-only runs (vmapped, own weights each: grouped convolutions) against the
    second run alone, fused loop, one epoch: the member's leaves within the fused-vs-step
    tolerance of the solo run's (the same steps, summed in another order)."""
    from bn_jax import datasets, pack, train
    from bn_jax import program as program_lib
    from bn_jax.config import ExperimentConfig, RuntimeConfig

    b, n = sizes.check_batch, sizes.check_steps
    data = datasets.random_dataset(b * n, b)
    members = [ExperimentConfig(model=sizes.check_model, train_mode="bn", epochs=1, batch_size=b, lr=0.02,
                                schedule="cosine", seed=s) for s in (0, 1)]
    runtime = RuntimeConfig(loop="fused", eval_batch_size=b)
    p = pack.Pack(members, 10, (32, 32, 3), n, "vmap")
    packed = pack.PackProgram(p, runtime, data, None)
    state, _ = packed.run(packed.put(p.initial_state()), packed.zero_totals(), 0, 0, n)
    solo_program = program_lib.build_program(members[1], runtime, data, None)
    solo, _ = solo_program.run(solo_program.put(train.create_train_state(members[1], 10, (32, 32, 3), n)),
                               solo_program.zero_totals(), 0, 0, n)
    diffs = _relative_differences(pack.member_of(state.params, 1), solo.params)
    worst = max(diffs, key=diffs.get)
    return _check(f"a pack's member equals its solo run ({n} steps of {sizes.check_model}, vmapped)",
                  diffs[worst] <= 1e-3, max_relative_difference=diffs[worst], worst_leaf=worst, tolerance=1e-3)


def convolution_counts(sizes: Sizes, mode: str) -> Dict[str, int]:
    """Convolutions in the compiled single train step of the small ResNet (the trainer's own
    program, step loop), on this backend."""
    from bn_jax import datasets, roofline, train
    from bn_jax import program as program_lib
    from bn_jax.config import ExperimentConfig, RuntimeConfig

    config = ExperimentConfig(model=sizes.check_model, train_mode=mode, batch_size=sizes.check_batch)
    program = program_lib.build_program(config, RuntimeConfig(loop="step"),
                                        datasets.random_dataset(sizes.check_batch, 1), mesh=None)
    state = program.put(train.create_train_state(config, 10, (32, 32, 3), steps_per_epoch=1))
    return roofline.convolution_counts(program.compile(state, program.zero_totals()).as_text())


def fused_cost_ratio(sizes: Sizes) -> Optional[float]:
    """XLA's cost of the fused program over one step's, on this backend: the throughput rows take
    the roofline from the fused program's cost, which is right only if this is ~1."""
    costs = {}
    for loop in ("fused", "step"):
        case = report_lib.Case("bn_jax", sizes.check_model, sizes.check_batch, "bn", "float32", loop, 1)
        costs[loop] = benchmark.jax_runner(case, 1, sizes.steps).cost()["flops"]
    return costs["fused"] / costs["step"] if costs["step"] else None


# ---- stage 3: throughput --------------------------------------------------------------------

def _case(sizes: Sizes, framework, mode, precision, loop, pack=None, init="seed", batch_size=None):
    return report_lib.Case(framework, sizes.model, batch_size or sizes.batch_size, mode, precision, loop, 1, pack, init)


def single_cases(sizes: Sizes) -> List[report_lib.Case]:
    """One run, the paper's batch: BN-only float32 and bfloat16, then full float32 (fused loop)."""
    return [_case(sizes, "bn_jax", "bn", "float32", "fused"), _case(sizes, "bn_jax", "bn", "bfloat16", "fused"),
            _case(sizes, "bn_jax", "full", "float32", "fused")]


def torch_cases(sizes: Sizes, variants: List[str]) -> List[report_lib.Case]:
    """The blog's loop eager (BN-only and full), the expert's loop eager and as a CUDA graph
    (float32, bfloat16), then the torch.compile rows, whose compiles cost the most time."""
    out = []
    if "eager" in variants:
        out += [_case(sizes, "torch", "bn", "float32", "eager"), _case(sizes, "torch", "full", "float32", "eager")]
    for loop in ("expert", "expert_graph"):
        if loop in variants:
            out += [_case(sizes, "torch", "bn", p, loop) for p in ("float32", "bfloat16")]
    if "compile" in variants:
        out.append(_case(sizes, "torch", "bn", "float32", "compile"))
    if "expert_compile" in variants:
        out.append(_case(sizes, "torch", "bn", "float32", "expert_compile"))
    return out


def pack_cases(sizes: Sizes) -> List[report_lib.Case]:
    """Packs of K BN-only runs with their own weights (grouped convolutions), then the largest
    with shared weights (one batch) and in bfloat16."""
    k = sizes.pack
    return ([_case(sizes, "bn_jax", "bn", "float32", "fused", n) for n in sizes.packs] +
            [_case(sizes, "bn_jax", "bn", "float32", "fused", k, "shared"),
             _case(sizes, "bn_jax", "bn", "bfloat16", "fused", k)])


def sweep_cases(sizes: Sizes) -> List[report_lib.Case]:
    """BN-only float32 at larger batches: outside the paper's recipe (batch 128), for how far the
    device is from saturation."""
    return [_case(sizes, "bn_jax", "bn", "float32", "fused", batch_size=b) for b in sizes.sweep_batches]


def throughput_cases(sizes: Sizes, torch_variants: List[str]) -> Dict[str, List[report_lib.Case]]:
    """Each timed stage's cases, in order."""
    return {"single": single_cases(sizes), "torch": torch_cases(sizes, torch_variants), "packs": pack_cases(sizes),
            "batch_sweep": sweep_cases(sizes)}


def measure_case(case: report_lib.Case, sizes: Sizes, peaks) -> Dict[str, Any]:
    """Compile, warm up and time one case; compile time is reported apart from the step time,
    and set-up (model initialisation, data, cost analysis) apart from both."""
    start = time.perf_counter()
    if case.framework == "bn_jax":
        runner = benchmark.jax_runner(case, 1, sizes.steps)
        run, cost, compile_s = runner.run, runner.cost(), runner.compile_s
    else:
        run, cost, compile_s = benchmark.torch_runner(case, 1), None, None
    t = time.perf_counter()
    setup_s = t - start - (compile_s or 0.0)
    run(sizes.steps if case.framework == "bn_jax" else sizes.warmup)  # bn_jax: its one compiled length
    warmup_s = time.perf_counter() - t
    times = report_lib.time_rounds({case.name: run}, sizes.steps, sizes.rounds)[case.name]
    row = report_lib.make_row(case, times, cost, peaks.get(case.precision) if cost else None)
    if compile_s is None:  # torch: compiles (or initialises cuDNN) inside its warm-up steps
        compile_s = max(0.0, warmup_s - sizes.warmup * row["ms_per_step"] / 1000)
    row.update(compile_s=compile_s, warmup_s=warmup_s, setup_s=setup_s)
    return row


class Throughput:
    """The timed stages' rows, in one table (the report's "throughput" section): each case is
    compiled, warmed up and timed in this process, one after another, and written as it is measured."""

    def __init__(self, sizes: Sizes, clock: Clock, report: Report, guard):
        self.sizes, self.clock, self.report, self.guard = sizes, clock, report, guard
        self.rows, self.skipped, self.failed, self.took, self.peaks = [], [], [], {}, None

    def measure(self, stage: str, cases: List[report_lib.Case]) -> None:
        from bn_jax import models, roofline
        if self.peaks is None:
            self.peaks = {p: roofline.measure_peaks(models.PRECISIONS[p]) for p in ("float32", "bfloat16")}
            self.report.update("throughput", peaks={p: dataclasses.asdict(v) for p, v in self.peaks.items()},
                               rows=[], skipped=[], failed=[])
        for case in cases:
            if self.guard.signalled:  # the check ends after this stage
                break
            self.one(stage, case)

    def one(self, stage: str, case: report_lib.Case) -> None:
        # a case in progress cannot be interrupted, so start one only when a case of its kind fit
        needed = max([self.sizes.min_case_s] + [t for (f, _), t in self.took.items() if f == case.framework])
        if case.loop in ("compile", "expert_compile"):  # (its compile alone may take minutes)
            needed = max(needed, self.sizes.min_compile_case_s)
        if self.clock.left() < needed:
            self.skipped.append({"case": case.name, "stage": stage,
                                 "reason": f"{self.clock.left():.0f}s of budget left, {needed:.0f}s needed"})
            return self.write()
        self.report.log(f"{stage}: {case.name} ...")
        start = time.time()
        try:
            row = measure_case(case, self.sizes, self.peaks)
        except Exception as e:  # noqa: BLE001  (out of memory, a failed torch.compile: keep the rest)
            self.failed.append({"case": case.name, "stage": stage,
                                "reason": f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}"})
            self.report.log(f"{stage}: {case.name} failed: {self.failed[-1]['reason']}")
        else:
            self.rows.append({**row, "stage": stage})
            self.report.log(f"{stage}: {case.name}: {row['images_per_second']:.0f} img/s, "
                            f"{row['ms_per_step']:.2f} ms/step, compile {row['compile_s']:.1f}s")
        self.took[(case.framework, case.name)] = time.time() - start
        self.write()

    def write(self) -> None:
        self.report.update("throughput", rows=self.rows, skipped=self.skipped, failed=self.failed,
                           comparisons=report_lib.comparisons(self.rows))
        with contextlib.suppress(ImportError):
            if self.rows:
                report_lib.plot(self.rows, os.path.join(self.report.out, "throughput.png"),
                                f"{self.rows[0]['model']} b{self.sizes.batch_size}, {self.report.data['date']}")


# ---- the set-up and XLA-flag stages (each measurement in a process of its own) ---------------

def setup_stage(sizes: Sizes, clock: Clock, report: Report, scratch: str) -> None:
    """Set-up seconds (import, initialisation, one fused compile) in fresh processes, cold and warm
    cache, default and GPU-kernel threefry lowering, and whether that lowering draws the same
    leaves. If it does, and sets up faster, the rest of the check uses it (reported)."""
    from benchmarks import setup_time
    # the default lowering compiles into this process's own cache, so the stages after it find it warm
    own = os.environ.get("JAX_COMPILATION_CACHE_DIR")
    result = setup_time.measure(sizes.model, sizes.batch_size, os.path.join(scratch, "setup"), sizes.setup_timeout_s,
                                on_row=lambda rows: report.update("setup", rows=rows),
                                cache_dirs={"default": own} if own else None,
                                left=lambda: clock.left() - sizes.min_case_s)
    rows = {(r["lowering"], r["cache"]): r for r in result["rows"]}
    same = (result["kernel_lowering_leaves"] or {}).get("equal")
    cold = [rows[(x, "cold")].get("setup_s") for x in setup_time.LOWERINGS]
    use_kernel = bool(same) and None not in cold and cold[1] < cold[0]
    if use_kernel:
        import jax
        jax.config.update("jax_threefry_gpu_kernel_lowering", True)
    warm = [r["setup_s"] for r in result["rows"] if r["cache"] == "warm" and "setup_s" in r
            and (same or r["lowering"] == "default")]
    report.update("setup", kernel_lowering_leaves=result["kernel_lowering_leaves"], kernel_lowering_used=use_kernel,
                  best_bit_identical_setup_s=min(warm) if warm else None)


def xla_flags_stage(sizes: Sizes, clock: Clock, report: Report) -> None:
    """BN-only float32 at the paper's batch under each XLA flag set, a process each (``benchmarks.xla_flags``)."""
    from benchmarks import xla_flags
    case = _case(sizes, "bn_jax", "bn", "float32", "fused")
    xla_flags.measure(case, sizes.flag_steps, 2, sizes.flag_timeout_s, left=clock.left,
                      on_row=lambda rows: report.update("xla_flags", rows=rows))


# ---- stage 4: the 160-epoch run -------------------------------------------------------------

def run_config(sizes: Sizes, data_dir: str):
    """(experiment, runtime) of the run stage: the paper's BN-only ResNet-110, fused loop."""
    from bn_jax.config import ExperimentConfig, RuntimeConfig
    return (ExperimentConfig(model=sizes.model, train_mode="bn", epochs=sizes.epochs,
                             batch_size=sizes.batch_size).validate(),
            RuntimeConfig(data_dir=data_dir, loop="fused").validate())


def summarize_run(history: List[Dict[str, Any]], epochs: int, session_first_epoch: int) -> Dict[str, Any]:
    """Progress of the run and its projection to ``epochs`` epochs from this session's steady epochs
    (the session's first epoch includes compilation, so it is left out when there are others)."""
    if not history:
        return {"epochs_done": 0}
    last = history[-1]
    steady = [r for r in history if r["epoch"] > session_first_epoch] or \
             [r for r in history if r["epoch"] >= session_first_epoch] or history
    images_per_second = sorted(r["images_per_second"] for r in steady)[len(steady) // 2]
    by_epoch = {r["epoch"]: r for r in history}
    epoch_s = [r["wall_time"] - by_epoch[r["epoch"] - 1]["wall_time"] for r in steady if r["epoch"] - 1 in by_epoch]
    out = {"epochs_done": last["epoch"], "steps": last["step"], "test_accuracy": last["test_accuracy"],
           "best_test_accuracy": max(r["test_accuracy"] for r in history), "train_loss": last["train_loss"],
           "wall_time_s": last["wall_time"], "images_per_second": images_per_second,
           "steady_epochs": [r["epoch"] for r in steady]}
    if epoch_s:
        out["epoch_s"] = sorted(epoch_s)[len(epoch_s) // 2]
        out[f"projected_{epochs}_epochs_s"] = epochs * out["epoch_s"]
    return out


def finished_run_analysis(config, workdir: str) -> Dict[str, Any]:
    """The finished run beside the paper (its reported test accuracy for this model), and its γ:
    the fraction of features with |γ| below the paper's threshold, overall and the layer with the most."""
    from bn_jax import analysis, paper_results, train_modes
    threshold = paper_results.DISABLED_THRESHOLD
    paper = paper_results.paper_result(config.model, config.width)
    run = analysis.load_run(workdir)
    per_layer, overall = analysis.disabled_fractions(train_modes.variables_of(analysis.restore_state(run)),
                                                     threshold)
    worst = max(per_layer, key=per_layer.get) if per_layer else None
    return {"final_test_accuracy": run.summary.get("final_test_accuracy"),
            "paper_test_accuracy": paper and paper.bn_only / 100,
            "gamma_threshold": threshold, "gamma_disabled_fraction": overall,
            "gamma_most_disabled_layer": worst, "gamma_most_disabled_fraction": per_layer.get(worst)}


def _read_history(workdir: str) -> List[Dict[str, Any]]:
    from bn_jax import metrics_log, workdir as workdir_lib
    return metrics_log.read_metrics(workdir_lib.RunDir(workdir).metrics)


def unpack_run(archive: str, workdir: str) -> None:
    """Unpack a run.tar.gz of an earlier check as ``workdir``. Its one top folder may carry an
    older run name: whether it holds this run is the trainer's to check, from its checkpoints."""
    with tarfile.open(archive) as tar:
        tops = {m.name.split("/")[0] for m in tar.getmembers()}
        if len(tops) != 1:
            raise ValueError(f"--resume_run {archive} holds {', '.join(sorted(tops))}, not one run folder")
        if os.path.exists(workdir):
            raise ValueError(f"--resume_run: {workdir} exists already; remove it or pass another --workdir")
        parent = os.path.dirname(os.path.abspath(workdir))
        os.makedirs(parent, exist_ok=True)
        staging = tempfile.mkdtemp(prefix=".unpack-", dir=parent)
        try:
            tar.extractall(staging, filter="data")
            os.rename(os.path.join(staging, tops.pop()), workdir)
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def pack_run(workdir: str, out: str) -> str:
    path = os.path.join(out, "run.tar.gz")
    with tarfile.open(path + ".tmp", "w:gz") as tar:
        tar.add(workdir, arcname=os.path.basename(os.path.normpath(workdir)))
    os.replace(path + ".tmp", path)
    return path


def run_stage(args, sizes: Sizes, clock: Clock, report: Report, data_dir: str, scratch: str, guard) -> None:
    from bn_jax import checkpoints, preemption, train
    from bn_jax import config as config_lib

    config, runtime = run_config(sizes, data_dir)
    # a smoke run's data are generated afresh each time, so its run lives and dies with them
    workdir = args.workdir or os.path.join(scratch if args.smoke else "runs", "gpu_check", config_lib.run_name(config))
    if args.resume_run:
        unpack_run(args.resume_run, workdir)
    first_epoch = len(_read_history(workdir)) + 1
    until = clock.deadline - sizes.pack_s
    if args.run_s is not None:
        until = min(until, time.time() + args.run_s)
    resume = (f"python -m benchmarks.gpu_check --out DIR --stages environment,run --resume_run run.tar.gz "
              f"--workdir {workdir} --data_dir {data_dir}{' --smoke' if args.smoke else ''}")
    report.update("run", workdir=workdir, config=config.to_dict(), status="running",
                  stop_at_elapsed_s=until - report.start, resume_command=resume,
                  continue_command=(f"python -m experiments.cifar --bn_only --model {config.model} "
                                    f"--epochs {config.epochs} --small_checkpoints --data_dir {data_dir} "
                                    f"--workdir {workdir}"))

    def log(message: str) -> None:
        report.log(f"run: {message}")
        if message.startswith("epoch "):
            report.update("run", **summarize_run(_read_history(workdir), config.epochs, first_epoch))

    options = checkpoints.CheckpointOptions(format="small", keep=2)
    # At the deadline the trainer checkpoints at its next call boundary and raises Preempted, as
    # for SIGTERM; a real signal (Ctrl-C, the job's own timeout) ends the whole check after packing
    # (the guard is the check's own, entered in main).
    guard.deadline = until
    status = "failed"
    try:
        train.train_and_evaluate(config, workdir, log=log, runtime=runtime, checkpoint_options=options, guard=guard)
        status = "finished"
    except preemption.Preempted as e:
        status = f"stopped: {e}"
        if guard.signalled:
            raise
    finally:
        report.update("run", status=status, **summarize_run(_read_history(workdir), config.epochs, first_epoch))
        if status == "finished":
            report.update("run", **finished_run_analysis(config, workdir))
        if os.path.isdir(workdir):  # whatever happened, the progress travels back
            report.update("run", archive=os.path.basename(pack_run(workdir, report.out)))


def _campaign_progress(workdir: str) -> Dict[str, Any]:
    history = _read_history(workdir) if os.path.isdir(workdir) else []
    return {"epochs_done": len(history), "test_accuracy": history[-1]["test_accuracy"] if history else None}


def campaign_stage(args, sizes: Sizes, clock: Clock, report: Report, data_dir: str, scratch: str, guard) -> None:
    """Train the campaign's unfinished runs in order until the deadline, then pack them all."""
    from bn_jax import analysis, checkpoints, preemption, train
    from bn_jax import config as config_lib
    from benchmarks import campaign

    root = os.path.join(scratch if args.smoke else "runs", "gpu_check", "campaign")
    if args.resume_campaign:
        campaign.unpack(args.resume_campaign, root)
    os.makedirs(root, exist_ok=True)
    runtime = config_lib.RuntimeConfig(data_dir=data_dir, loop="fused").validate()
    until = clock.deadline - sizes.pack_s
    if args.run_s is not None:
        until = min(until, time.time() + args.run_s)
    guard.deadline = until
    rows, started = [], False
    try:
        for entry in args.campaign_runs:
            config = entry["config"]
            workdir = os.path.join(root, config_lib.run_name(config))
            row = {"run": config_lib.run_name(config), "why": entry["why"]}
            rows.append(row)
            if entry["archive"] and not args.smoke and not os.path.exists(workdir) and os.path.isfile(entry["archive"]):
                unpack_run(entry["archive"], workdir)
            if analysis.is_finished(workdir):
                row.update(status="finished", **_campaign_progress(workdir))
                continue
            if (started and guard.requested) or clock.left() < sizes.min_run_s + sizes.pack_s:
                # (the first run trains at least one call, as --run_s 0 says, if the budget allows one)
                row["status"] = f"not started: {max(0.0, clock.left()):.0f}s of budget left"
                continue
            started = True
            report.log(f"campaign: {row['run']} ...")
            try:
                train.train_and_evaluate(config, workdir, log=lambda m, r=row: report.log(f"campaign {r['run']}: {m}"),
                                         runtime=runtime, guard=guard,
                                         checkpoint_options=checkpoints.CheckpointOptions(format="small", keep=2))
                row["status"] = "finished"
            except preemption.Preempted as e:
                row["status"] = f"stopped: {e}"
                if guard.signalled:
                    raise
            except Exception as e:  # noqa: BLE001  (out of memory, an unusable folder: the next run goes on)
                row["status"] = f"failed: {type(e).__name__}: {str(e)[:300]}"
                report.log(f"campaign {row['run']} failed: {row['status']}")
            finally:
                row.update(_campaign_progress(workdir))
                report.update("campaign", runs=rows)
    finally:
        report.update("campaign", runs=rows, archive=os.path.basename(campaign.pack(root, report.out)))


# ---- smoke data and the report's text --------------------------------------------------------

def smoke_data(root: str) -> str:
    """A tiny CIFAR-like tarball (4 classes of random 32×32 PNGs) in the image-folder layout."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    folder = os.path.join(root, "smoke_data")
    for split, n in (("train", 16), ("test", 4)):
        for c in range(4):
            os.makedirs(os.path.join(folder, split, f"class{c}"), exist_ok=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
                    os.path.join(folder, split, f"class{c}", f"{i:04d}.png"))
    path = os.path.join(root, "smoke_data.tar.gz")
    with tarfile.open(path, "w:gz") as tar:
        for split in ("train", "test"):
            tar.add(os.path.join(folder, split), arcname=split)
    return path


def targets(data: Dict[str, Any], goals: Optional[Dict[str, Tuple[str, float]]] = None) -> List[Dict[str, Any]]:
    """The GPU targets (``read_targets`` by default) against what was measured (None where it was not)."""
    goals = goals or read_targets()
    rows = [r for r in data["stages"].get("throughput", {}).get("rows", []) if r.get("stage") != "batch_sweep"]

    def row(framework, mode, loop, precision="float32", pack=None):
        match = [r for r in rows if (r["framework"], r["mode"], r["loop"], r["precision"], r.get("pack"),
                                     r.get("init", "seed")) == (framework, mode, loop, precision, pack, "seed")]
        return match[0] if match else None

    def speed(*key, **kw):
        r = row(*key, **kw)
        return r and r["images_per_second"]

    def expert(precision):  # the fastest of the expert's loops that ran
        found = [v for v in (speed("torch", "bn", loop, precision) for loop in ("expert", "expert_graph",
                                                                                  "expert_compile")) if v]
        return max(found) if found else None

    bn, full = speed("bn_jax", "bn", "fused"), speed("bn_jax", "full", "fused")
    bn_bf16 = speed("bn_jax", "bn", "fused", "bfloat16")
    pack, pack_bf16 = speed("bn_jax", "bn", "fused", pack=PACK), speed("bn_jax", "bn", "fused", "bfloat16", PACK)
    eager, compiled = speed("torch", "bn", "eager"), speed("torch", "bn", "compile")
    expert_f32, expert_bf16 = expert("float32"), expert("bfloat16")
    ms = {p: (row("bn_jax", "bn", "fused", p) or {}).get("ms_per_step") for p in ("float32", "bfloat16")}
    run = data["stages"].get("run", {})
    projected = next((v for k, v in run.items() if k.startswith("projected_")), None)
    measured = [("bn_jax BN-only images/s over the PyTorch loop (eager)", bn and eager and bn / eager,
                 "bn_over_torch_eager"),
                ("bn_jax BN-only images/s over the PyTorch loop (torch.compile)", bn and compiled and bn / compiled,
                 "bn_over_torch_compile"),
                ("BN-only step time over full step time", bn and full and full / bn, "bn_over_full_time"),
                ("the 160-epoch run, projected seconds", projected, "run_160_epochs_s"),
                (f"a pack of {PACK} (own weights each) over one run, images/s", pack and bn and pack / bn,
                 "pack8_over_solo"),
                (f"a pack of {PACK}, images/s of all members", pack, "pack8_images_per_second"),
                (f"a pack of {PACK} in bfloat16, images/s of all members", pack_bf16, "pack8_bf16_images_per_second"),
                ("one BN-only run, float32, ms/step", ms["float32"], "bn_ms_per_step"),
                ("one BN-only run, bfloat16, ms/step", ms["bfloat16"], "bn_bf16_ms_per_step"),
                ("bn_jax BN-only images/s over the expert's PyTorch loop (float32, its fastest variant)",
                 bn and expert_f32 and bn / expert_f32, "bn_over_torch_expert"),
                ("… in bfloat16, over the expert's loop in bfloat16", bn_bf16 and expert_bf16 and bn_bf16 / expert_bf16,
                 "bn_bf16_over_torch_expert_bf16"),
                (f"a pack of {PACK} over the expert's PyTorch loop (float32), images/s",
                 pack and expert_f32 and pack / expert_f32, "pack8_over_torch_expert"),
                ("set-up seconds of one case (warm cache, a bit-identical lowering)",
                 data["stages"].get("setup", {}).get("best_bit_identical_setup_s"), "setup_s")]
    out = []
    for what, value, key in measured:
        op, target = goals[key]
        met = None if value is None else {"≥": value >= target, ">": value > target, "≤": value <= target}[op]
        out.append({"target": f"{what} {op} {target:g}", "measured": value, "met": met})
    return out


def _fmt(value) -> str:
    if value is None:
        return "not measured"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def render_markdown(data: Dict[str, Any]) -> str:
    stages = data["stages"]
    env = stages.get("environment", {})
    lines = [f"# GPU check: {env.get('device_kind', '?')} ({env.get('platform', '?')}), {data['date']}", "",
             f"`{data['command']}`", "", f"Elapsed {data.get('elapsed_s', 0):.0f} s of a {data['budget_s']:.0f} s budget"
             + (" (smoke sizes)." if data["smoke"] else "."), ""]
    for name in STAGES:
        if stages.get(name, {}).get("error"):
            lines += [f"**{name} failed:** `{stages[name]['error']}`", ""]
    if env:
        lines += ["## Environment", "", "| | |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in env.get("versions", {}).items()]
        lines += [f"| {k} | {_fmt(env.get(k))} |" for k in ("device_count", "memory_bytes_limit",
                                                             "default_matmul_precision", "cpu_count")]
        if env.get("nvidia_smi"):
            lines += ["", "```", env["nvidia_smi"], "```"]
        lines.append("")
    checks = stages.get("correctness", {}).get("checks", [])
    if checks:
        lines += ["## Correctness", "", "| check | passed | detail |", "|---|---|---|"]
        for c in checks:
            detail = {k: v for k, v in c.items() if k not in ("name", "passed")}
            lines.append(f"| {c['name']} | {'yes' if c['passed'] else '**NO**'} | `{json.dumps(_finite(detail))}` |")
        ratio = stages["correctness"].get("fused_cost_over_step_cost")
        if ratio is not None:
            lines.append(f"\nXLA's cost of the fused program over one step's: {ratio:.4f} (1 = the roofline "
                         "columns below, read off the fused programs, are per step).")
        lines.append("")
    tp = stages.get("throughput", {})
    if tp.get("rows"):
        lines += ["## Throughput", "", report_lib.format_table(tp["rows"], tp.get("comparisons", [])), "",
                  "| case | set-up s | compile s | warm-up s |", "|---|---|---|---|"]
        lines += [f"| {report_lib.Case.of_row(r).name} "
                  f"| {_fmt(r.get('setup_s'))} | {r['compile_s']:.1f} | {r['warmup_s']:.2f} |" for r in tp["rows"]]
        lines.append("")
    sweep = [r for r in tp.get("rows", []) if r.get("stage") == "batch_sweep"]
    if sweep:
        lines += [f"Batches {', '.join(str(r['batch_size']) for r in sweep)} are the batch sweep: outside the "
                  "paper's recipe (batch 128), for how far one run is from filling the device.", ""]
    for s in tp.get("failed", []):
        lines.append(f"- **failed** {s['case']}: `{s['reason']}`")
    for s in tp.get("skipped", []):
        lines.append(f"- skipped {s['case']}: {s['reason']}")
    lines += _setup_and_flags_markdown(stages)
    runs = stages.get("campaign", {}).get("runs", [])
    if runs:
        lines += ["", "## The campaign", "", "| run | status | epochs | test accuracy |", "|---|---|---|---|"]
        lines += [f"| {r['run']} | {r.get('status', '')} | {_fmt(r.get('epochs_done'))} | {_fmt(r.get('test_accuracy'))} |"
                  for r in runs]
    run = stages.get("run", {})
    if run:
        lines += ["", "## The 160-epoch run", "", "| | |", "|---|---|"]
        lines += [f"| {k} | {_fmt(run.get(k))} |" for k in run if k not in ("config",)]
        lines.append("")
    lines += ["## Targets", "", "| target | measured | met |", "|---|---|---|"]
    lines += [f"| {t['target']} | {_fmt(t['measured'])} | {'–' if t['met'] is None else ('yes' if t['met'] else 'no')} |"
              for t in targets(data)]
    return "\n".join(lines) + "\n"


def _setup_and_flags_markdown(stages: Dict[str, Any]) -> List[str]:
    lines = []
    setup = stages.get("setup", {})
    if setup.get("rows"):
        lines += ["", "## Set-up (fresh process to a compiled step)", "",
                  "| threefry lowering | cache | set-up s | import s | init s | compile s |", "|---|---|---|---|---|---|"]
        lines += [f"| {r['lowering']} | {r['cache']} | " + (f"{r['error']} | | | |" if "error" in r else
                  f"{r['setup_s']:.1f} | {r['import_s']:.1f} | {r['init_s']:.1f} | {r['compile_s']:.1f} |")
                  for r in setup["rows"]]
        leaves = setup.get("kernel_lowering_leaves")
        if leaves is not None:
            lines.append(f"\nThe GPU-kernel lowering draws bit-identical initial leaves: "
                         f"{'yes' if leaves['equal'] else 'NO, differing: ' + ', '.join(leaves['differing'][:5])}"
                         f" ({leaves['leaves']} leaves); used for the rest of the check: "
                         f"{'yes' if setup.get('kernel_lowering_used') else 'no'}.")
    flags = stages.get("xla_flags", {}).get("rows", [])
    if flags:
        lines += ["", "## XLA options (a process each)", "",
                  "| option | compiled | ms/step | speed-up | bit-equal | command buffers | compile s | note |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in flags:
            lines.append(f"| {r['name']} (`{r['xla_flags'] or 'none'}`) | {_fmt(r.get('compiled'))} "
                         f"| {_fmt(r.get('ms_per_step'))} | {_fmt(r.get('speedup_over_default'))} "
                         f"| {_fmt(r.get('bit_equal_to_default'))} | {_fmt(r.get('command_buffers'))} "
                         f"| {_fmt(r.get('compile_s'))} | {r.get('error', '')} |")
    return lines


# ---- main -----------------------------------------------------------------------------------

def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    sizes = SMOKE if args.smoke else FULL
    if args.torch:  # JAX would otherwise hold 75% of GPU memory while PyTorch runs
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    report = Report(args.out, argv, args.budget_s, args.smoke)
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as scratch:
        # Every case initialises its ResNet in a compiled program (19 s to compile for ResNet-110
        # on the 2-core dev CPU; on the H200 each ResNet-110 case spent about 70 s outside its
        # step's compile and timing). A persistent cache compiles each distinct program once.
        # (Set before JAX is imported: it reads the variable then.)
        os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(scratch, "xla_cache"))
        from bn_jax import preemption
        with preemption.PreemptionGuard() as guard:
            code = run_stages(args, sizes, report, Clock(args.budget_s, report.start), guard, scratch)
    report.data["tensorflow_imported"] = any(m in sys.modules for m in ("tensorflow", "tensorflow_datasets"))
    report.data["targets"] = targets(report.data)
    report.data["elapsed_s"] = report.elapsed()
    report.write()
    failures = report.failures()
    report.log(f"done in {report.elapsed():.0f}s; results in {args.out}"
               + (f"; FAILED: {'; '.join(failures)}" if failures else ""))
    report.close()
    return code if code is not None else (1 if failures else 0)


def _cuda() -> bool:
    import torch
    return torch.cuda.is_available()


def run_stages(args, sizes: Sizes, report: Report, clock: Clock, guard, scratch: str) -> Optional[int]:
    """Each stage in turn; a stage that raises is reported and the next one runs. A signal ends
    the check (exit 75, or 130 for a second Ctrl-C) after the run stage has packed its progress."""
    from bn_jax import preemption

    from benchmarks import torch_reference

    data_dir = args.data_dir or smoke_data(scratch)
    torch_variants = args.torch
    if torch_variants and not torch_reference.available():
        report.log("PyTorch is not installed: no PyTorch rows")
        torch_variants = []
    if "expert_graph" in torch_variants and not _cuda():
        report.log("no CUDA device for PyTorch: no CUDA-graph rows")
        torch_variants = [v for v in torch_variants if v != "expert_graph"]
    timed, cases = Throughput(sizes, clock, report, guard), throughput_cases(sizes, torch_variants)
    stage_fns = {"environment": lambda: report.update("environment", **environment()),
                 "correctness": lambda: correctness(sizes, scratch, report),
                 "setup": lambda: setup_stage(sizes, clock, report, scratch),
                 "xla_flags": lambda: xla_flags_stage(sizes, clock, report),
                 "run": lambda: run_stage(args, sizes, clock, report, data_dir, scratch, guard),
                 "campaign": lambda: campaign_stage(args, sizes, clock, report, data_dir, scratch, guard),
                 **{name: functools.partial(timed.measure, name, cases[name]) for name in TIMED}}
    for name in (s for s in STAGES if s in args.stages):
        if guard.signalled:
            report.data["stopped"] = f"{guard.reason} before the {name} stage"
            return 75
        if name == "run" and clock.left() < sizes.min_run_s + sizes.pack_s:
            report.update("run", status=f"skipped: {clock.left():.0f}s of budget left")
            continue
        report.log(f"{name} ...")
        try:
            stage_fns[name]()
        except preemption.Preempted as e:
            report.data["stopped"] = f"{name}: {e}"
            return 75
        except KeyboardInterrupt:
            report.data["stopped"] = f"{name}: a second SIGINT"
            return 130
        except Exception as e:  # noqa: BLE001  (report it, go on with the next stage)
            report.update(name, error=f"{type(e).__name__}: {str(e)[:500]}", traceback=traceback.format_exc())
            report.log(f"{name} failed: {type(e).__name__}: {e}")
    return None


if __name__ == "__main__":
    sys.exit(main())
