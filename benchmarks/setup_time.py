"""Set-up seconds of a run before its first step: the jitted initialisation of the model and the
compile of its training program, each in a fresh process, with JAX's persistent compilation
cache cold (an empty folder) and then warm (the same folder), for the default threefry lowering
and for ``jax_threefry_gpu_kernel_lowering`` (one GPU kernel per random draw instead of
thousands of fused XLA ops, which JAX added to cut GPU compile times).

The kernel lowering is worth keeping only if it draws the very same weights: every initial
leaf is compared bit for bit with the default lowering's (``leaves_equal``). On a CPU the flag
changes nothing (the lowering is GPU-only), so there the comparison is trivially equal.

``python -m benchmarks.setup_time --model resnet110 --out DIR`` writes DIR/setup.json, one row
per (lowering, cache) as it is measured (about 3 minutes on the 2-core CPU for ResNet-110).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOWERINGS = ("default", "kernel")
# cold rows first: they hold the comparison of the lowerings, should the budget stop the rest
CASES = [(lowering, cache) for cache in ("cold", "warm") for lowering in LOWERINGS]


def child(model: str, batch_size: int, lowering: str, cache_dir: str, leaves_path: str) -> Dict[str, Any]:
    """In a fresh process: import, initialise, compile one fused call; seconds of each, and the
    initial leaves saved to ``leaves_path`` (.npz)."""
    t0 = time.perf_counter()
    import jax
    import numpy as np
    jax.config.update("jax_threefry_gpu_kernel_lowering", lowering == "kernel")
    from bn_jax import compile_cache, datasets, train
    from bn_jax import program as program_lib
    from bn_jax.config import ExperimentConfig, RuntimeConfig
    compile_cache.use(cache_dir)
    t1 = time.perf_counter()
    config = ExperimentConfig(model=model, train_mode="bn", batch_size=batch_size).validate()
    state = train.create_train_state(config, 10, (32, 32, 3), steps_per_epoch=2)
    jax.block_until_ready(state.params)
    t2 = time.perf_counter()
    program = program_lib.build_program(config, RuntimeConfig(loop="auto"), datasets.random_dataset(2 * batch_size, 1),
                                        mesh=None)
    program.compile(program.put(state), program.zero_totals(), stop=2)
    t3 = time.perf_counter()
    leaves = jax.tree_util.tree_leaves_with_path({"params": state.params, "batch_stats": state.batch_stats})
    np.savez(leaves_path, **{jax.tree_util.keystr(p): np.asarray(x) for p, x in leaves})
    return {"import_s": t1 - t0, "init_s": t2 - t1, "compile_s": t3 - t2, "setup_s": t3 - t0,
            "loop": program.loop, "platform": jax.devices()[0].platform}


def leaves_equal(a_path: str, b_path: str) -> Dict[str, Any]:
    """Whether two saved initial states are bit-identical, leaf by leaf; the differing leaves."""
    import numpy as np
    with np.load(a_path) as a, np.load(b_path) as b:
        differ = sorted(k for k in a.files if k not in b.files or a[k].tobytes() != b[k].tobytes())
        differ += sorted(set(b.files) - set(a.files))
        return {"leaves": len(a.files), "differing": differ, "equal": not differ}


def measure(model: str, batch_size: int, scratch: str, timeout_s: float = 300.0,
            on_row=lambda rows: None, cache_dirs: Optional[Dict[str, str]] = None,
            left=lambda: float("inf")) -> Dict[str, Any]:
    """Every (lowering, cache) case in its own process, one after another; ``on_row`` sees the rows
    so far after each. A case that fails or times out is a row with its error; one is not started
    when ``left()`` is under its timeout. ``cache_dirs[lowering]``: an empty folder for that
    lowering's cache (default: one under ``scratch``), e.g. the caller's own, which it then finds warm."""
    rows: List[Dict[str, Any]] = []
    os.makedirs(scratch, exist_ok=True)
    for lowering, cache in CASES:
        cache_dir = (cache_dirs or {}).get(lowering) or os.path.join(scratch, f"cache_{lowering}")
        leaves = os.path.join(scratch, f"leaves_{lowering}.npz")
        row: Dict[str, Any] = {"lowering": lowering, "cache": cache, "model": model, "batch_size": batch_size}
        if left() < timeout_s:
            row["error"] = f"skipped: {left():.0f}s of budget left, {timeout_s:.0f}s needed"
            rows.append(row)
            on_row(rows)
            continue
        code = ("import json, sys; from benchmarks import setup_time; "
                "print(json.dumps(setup_time.child(sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5])))")
        try:
            out = subprocess.run([sys.executable, "-c", code, model, str(batch_size), lowering, cache_dir, leaves],
                                 cwd=ROOT, capture_output=True, text=True, timeout=timeout_s)
            if out.returncode:
                row["error"] = f"exit {out.returncode}: {(out.stderr.strip().splitlines() or [''])[-1][:300]}"
            else:
                row.update(json.loads(out.stdout.strip().splitlines()[-1]))
        except subprocess.TimeoutExpired:
            row["error"] = f"timed out after {timeout_s:.0f}s"
        rows.append(row)
        on_row(rows)
    paths = [os.path.join(scratch, f"leaves_{x}.npz") for x in LOWERINGS]
    same = leaves_equal(*paths) if all(map(os.path.exists, paths)) else None
    return {"rows": rows, "kernel_lowering_leaves": same}


def build_parser():
    p = argparse.ArgumentParser(prog="python -m benchmarks.setup_time", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet110", help="model whose set-up is timed (default resnet110)")
    p.add_argument("--batch_size", type=int, default=128, help="batch of the compiled program (default 128)")
    p.add_argument("--timeout_s", type=float, default=300.0, help="per case (default 300)")
    p.add_argument("--out", default="runs/setup_time", help="folder for setup.json (default runs/setup_time)")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "setup.json")
    header = {"command": "python -m benchmarks.setup_time " + " ".join(argv if argv is not None else sys.argv[1:]),
              "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "host": os.uname().nodename}

    def write(result):
        with open(path + ".tmp", "w") as f:
            json.dump({**header, **result}, f, indent=2)
        os.replace(path + ".tmp", path)

    with tempfile.TemporaryDirectory(prefix="setup_time_") as scratch:
        result = measure(args.model, args.batch_size, scratch, args.timeout_s, on_row=lambda rows: write({"rows": rows}))
    write(result)
    for r in result["rows"]:
        print(f"{r['lowering']:8s} {r['cache']:5s} " + (r.get("error") or
              f"set-up {r['setup_s']:.1f}s (import {r['import_s']:.1f}, init {r['init_s']:.1f}, "
              f"compile {r['compile_s']:.1f}, {r['loop']} loop)"))
    print("kernel lowering draws the same leaves:", result["kernel_lowering_leaves"])
    return 0 if all("error" not in r for r in result["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
