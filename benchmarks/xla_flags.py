"""XLA options measured as rows, each in a process of its own under a timeout, so a flag that
crashes the compiler or hangs loses only its own row.

A row says whether the program compiled, its ms per step (the fused loop, ``benchmark.jax_runner``),
its compile seconds (every row compiles cold: no persistent cache), how many command buffers
(CUDA graphs) the optimized program holds (computations named ``command_buffer…`` in its HLO
text), and whether its trained state is bit-identical to the same steps without the flags. A
second ``default`` row, last, is the control: on a GPU, autotuning may pick other algorithms in
another process, which alone can break bit-equality. What measures faster and bit-equal may become a default; nothing here sets one.
"""

import dataclasses
import hashlib
import json
import os
import re
import subprocess
import sys
import time
from typing import Any, Callable, Dict, List

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name → XLA_FLAGS added to the environment's (the first is the baseline the others are compared with)
FLAG_SETS = {
    "default": "",
    "conv fusion + while loops as command buffers": "--xla_gpu_experimental_enable_conv_fusion=true "
                                                    "--xla_gpu_enable_command_buffer=+WHILE",
    "command buffers from 1 op": "--xla_gpu_graph_min_graph_size=1",
    "command buffers from 2 ops": "--xla_gpu_graph_min_graph_size=2",
    "autotune level 1 (compile time)": "--xla_gpu_autotune_level=1",
    "default again (control)": "",
}


def state_digest(state) -> str:
    """SHA-256 of every leaf of params and batch_stats, in order: equal digests, equal bits."""
    import jax
    import numpy as np
    h = hashlib.sha256()
    for leaf in jax.tree_util.tree_leaves((state.params, state.batch_stats)):
        h.update(np.asarray(leaf).tobytes())
    return h.hexdigest()


def child(case_json: str, steps: int, rounds: int) -> Dict[str, Any]:
    """In this process (XLA_FLAGS already set): compile the case, warm up, time; its row."""
    from benchmarks import benchmark, report
    case = report.Case(**json.loads(case_json))
    runner = benchmark.jax_runner(case, 1, steps)
    runner.run(steps)
    times = report.time_rounds({case.name: runner.run}, steps, rounds)[case.name]
    text = runner.executable.as_text() if runner.executable is not None else ""
    return {"compiled": True, "compile_s": runner.compile_s, "ms_per_step": 1000 * sorted(times)[len(times) // 2],
            "command_buffers": len(re.findall(r"^%?command_buffer\S*\s", text, re.M)), "state_sha256": state_digest(runner.state()),
            "steps_trained": steps * (1 + rounds)}


def measure(case, steps: int, rounds: int, timeout_s: float, flag_sets: Dict[str, str] = None,
            left: Callable[[], float] = lambda: float("inf"), on_row=lambda rows: None) -> List[Dict[str, Any]]:
    """One row per flag set, in order, each in its own process; stops starting rows when ``left()``
    is below the timeout. Rows after the first say whether they are bit-equal to it."""
    rows: List[Dict[str, Any]] = []
    code = ("import json, sys; from benchmarks import xla_flags; "
            "print(json.dumps(xla_flags.child(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))))")
    for name, flags in (flag_sets or FLAG_SETS).items():
        row = {"name": name, "xla_flags": flags, "case": case.name}
        if left() < timeout_s:
            row.update(compiled=None, error=f"skipped: {left():.0f}s of budget left, {timeout_s:.0f}s needed")
            rows.append(row)
            on_row(rows)
            continue
        # no persistent cache: every row compiles cold, so their compile seconds compare
        env = {**os.environ, "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} {flags}".strip(),
               "JAX_ENABLE_COMPILATION_CACHE": "false"}
        start = time.time()
        try:
            out = subprocess.run([sys.executable, "-c", code, json.dumps(dataclasses.asdict(case)), str(steps),
                                  str(rounds)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s)
            if out.returncode:
                tail = (out.stderr.strip().splitlines() or [""])[-1][:300]
                row.update(compiled=False, error=f"exit {out.returncode}: {tail}")
            else:
                row.update(json.loads(out.stdout.strip().splitlines()[-1]))
        except subprocess.TimeoutExpired:
            row.update(compiled=False, error=f"timed out after {timeout_s:.0f}s")
        row["wall_s"] = time.time() - start
        base = rows[0] if rows else None
        if base and base.get("state_sha256") and row.get("state_sha256"):
            row["bit_equal_to_default"] = row["state_sha256"] == base["state_sha256"]
            row["speedup_over_default"] = base["ms_per_step"] / row["ms_per_step"]
        rows.append(row)
        on_row(rows)
    return rows
