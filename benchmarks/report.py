"""What every bn_jax benchmark report shares: its cases, timed rounds, rows, tables, plots, header
and writing. ``benchmark`` (the step table), ``input_benchmark`` (the input pipeline) and
``gpu_check`` build on it; ``gpu_check`` also runs the benchmark's cases through its public
runners (``jax_runner``, ``torch_runner``), and no module reads another's private names.
"""

import dataclasses
import datetime
import json
import os
import platform
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional

from tqdm import tqdm

# The command's duration as a report states it (``wall_s``): from when the benchmark first loaded this
# module (before JAX starts) to the report's writing, so that a documented command says how long it takes.
STARTED = time.monotonic()


@dataclasses.dataclass
class Case:
    framework: str  # "bn_jax" or "torch"
    model: str
    batch_size: int
    mode: str
    precision: str
    loop: str  # bn_jax: step | fused; torch: eager | compile (the blog's loop) | expert | expert_graph | expert_compile
    devices: Optional[int]  # bn_jax: mesh size, None = unsharded; torch: 1
    pack: Optional[int] = None  # bn_jax: K runs trained as one pack (bn_jax.pack); None: one run
    init: str = "seed"  # a pack's members: their own initial weights (seed), or the first's (shared)
    members: str = "auto"  # how the pack's step trains them (bn_jax.pack.resolve_members)

    @property
    def name(self) -> str:
        dev = "" if self.framework == "torch" else f" ×{self.devices or 'unsharded'}"
        pack = f" pack{self.pack} {self.init}-init {self.members}" if self.pack else ""
        return f"{self.framework} {self.model} b{self.batch_size} {self.mode} {self.precision} {self.loop}{dev}{pack}"

    @classmethod
    def of_row(cls, row: Dict) -> "Case":
        return cls(**{f.name: row[f.name] for f in dataclasses.fields(cls) if f.name in row})

    @property
    def images_per_step(self) -> int:
        return self.batch_size * (self.pack or 1)


def split(value: str) -> List[str]:
    return [v for v in value.split(",") if v]


def positive_ints(value: str, flag: str) -> List[int]:
    items = split(value)
    if not items or not all(v.isdigit() and int(v) > 0 for v in items):
        raise ValueError(f"{flag} takes comma-separated positive integers, got {value!r}")
    return [int(v) for v in items]


def unwritable(out: str) -> Optional[str]:
    from bn_jax import workdir
    problem = workdir.unwritable(out)
    return f"cannot write to --out {out}: {problem}" if problem else None


def time_rounds(runners: Dict[str, Callable[[int], None]], steps: int, rounds: int,
                on_round: Callable[[Dict[str, List[float]], int], None] = lambda times, done: None
                ) -> Dict[str, List[float]]:
    """Seconds per step of each runner, one entry per round; rounds interleave the runners.
    ``on_round(times, rounds_done)`` after each round (the benchmark writes its report there, so
    a run killed at its limit keeps the rounds it finished)."""
    times = {name: [] for name in runners}
    with tqdm(total=rounds * len(runners), desc="timing", leave=False) as bar:
        for done in range(1, rounds + 1):
            for name, run in runners.items():
                t = time.perf_counter()
                run(steps)
                times[name].append((time.perf_counter() - t) / steps)
                bar.update()
            on_round(times, done)
    return times


def make_row(case: Case, seconds_per_step: List[float], cost: Optional[Dict[str, float]] = None,
             peak=None) -> Dict:
    """A report row: the median of the timed rounds and, given XLA's cost of one step and the
    device's peaks (bn_jax.roofline), the roofline limits beside it."""
    t = statistics.median(seconds_per_step)
    row = {**dataclasses.asdict(case), "ms_per_step": 1000 * t, "images_per_second": case.images_per_step / t,
           "ms_per_step_rounds": [1000 * x for x in seconds_per_step]}
    if case.pack:  # (a pack's step trains every member: images/s are the pack's, all members together)
        row["ms_per_member_step"] = 1000 * t / case.pack
    if cost:  # XLA costs one device's share of the sharded step: its per-device batch
        per_device = case.images_per_step / (case.devices or 1)
        row["flops_per_image"] = None if cost["flops"] is None else cost["flops"] / per_device
        row["bytes_per_image"] = cost["bytes"] / per_device
    if cost and peak:
        devices = case.devices or 1
        if row["flops_per_image"] is not None:  # unknown where convolutions are cuDNN calls
            row["compute_limit_images_per_second"] = devices * peak.compute_limit(row["flops_per_image"])
        row["memory_limit_images_per_second"] = devices * peak.memory_limit(row["bytes_per_image"])
        row["limit_images_per_second"] = devices * peak.limit(row["flops_per_image"], row["bytes_per_image"])
        row["fraction_of_limit"] = row["images_per_second"] / row["limit_images_per_second"]
    return row


def comparisons(rows: List[Dict]) -> List[Dict]:
    """The ratios the report is for: bn/full step time, and bn_jax bn against PyTorch bn."""
    out = pack_comparisons(rows)
    rows = [r for r in rows if not r.get("pack")]
    by = {(r["framework"], r["model"], r["batch_size"], r["mode"], r["precision"], r["loop"], r["devices"]): r
          for r in rows}
    for r in rows:
        key = (r["framework"], r["model"], r["batch_size"], "full", r["precision"], r["loop"], r["devices"])
        if r["mode"] == "bn" and key in by:
            out.append({"what": f"bn/full step time, {r['framework']} {r['model']} b{r['batch_size']} "
                                f"{r['precision']} {r['loop']}",
                        "ratio": r["ms_per_step"] / by[key]["ms_per_step"]})
    jax_bn = [r for r in rows if r["framework"] == "bn_jax" and r["mode"] == "bn"]
    for t in (r for r in rows if r["framework"] == "torch" and r["mode"] == "bn"):
        mine = [r for r in jax_bn if (r["model"], r["batch_size"], r["precision"]) ==
                (t["model"], t["batch_size"], t["precision"])]
        if mine:
            best = max(mine, key=lambda r: r["images_per_second"])
            out.append({"what": f"bn_jax bn {t['precision']} {best['loop']} ×{best['devices'] or 'unsharded'} over "
                                f"torch {t['loop']} bn, {t['model']} b{t['batch_size']} (images/s)",
                        "ratio": best["images_per_second"] / t["images_per_second"]})
    return out


def pack_comparisons(rows: List[Dict]) -> List[Dict]:
    """Each pack's images/s (all members) over one run's of the same step, measured beside it."""
    def key(r):
        return r["model"], r["batch_size"], r["mode"], r["precision"], r["loop"], r["devices"]
    solo = {key(r): r for r in rows if r["framework"] == "bn_jax" and not r.get("pack")}
    return [{"what": f"pack of {r['pack']} ({r['init']} init, {r.get('members', 'auto')}) over one run, "
                     f"{r['model']} b{r['batch_size']} "
                     f"{r['mode']} {r['precision']} {r['loop']} (images/s)",
             "ratio": r["images_per_second"] / solo[key(r)]["images_per_second"]}
            for r in rows if r.get("pack") and key(r) in solo]


def pack_cell(row: Dict) -> str:
    return f"{row['pack']} ({row['init']} init, {row.get('members', 'auto')})" if row.get("pack") else "–"


def format_table(rows: List[Dict], comps: List[Dict]) -> str:
    head = ("| framework | model | batch | mode | precision | loop | devices | pack | ms/step | images/s | "
            "compute-bound images/s | memory-bound images/s | % of roofline |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        compute, memory = (f"{r[k]:.0f}" if r.get(k) else "–" for k in ("compute_limit_images_per_second",
                                                                         "memory_limit_images_per_second"))
        frac = f"{100 * r['fraction_of_limit']:.1f}" if r.get("fraction_of_limit") else "–"
        lines.append(f"| {r['framework']} | {r['model']} | {r['batch_size']} | {r['mode']} | {r['precision']} | "
                     f"{r['loop']} | {r['devices'] or 'unsharded'} | {pack_cell(r)} | {r['ms_per_step']:.2f} | "
                     f"{r['images_per_second']:.0f} | {compute} | {memory} | {frac} |")
    lines += ["", "| comparison | ratio |", "|---|---|"] + [f"| {c['what']} | {c['ratio']:.2f} |" for c in comps]
    return "\n".join(lines)


def plot(rows: List[Dict], path: str, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [Case.of_row(r).name for r in rows]
    colors = ["tab:blue" if r["framework"] == "bn_jax" else "tab:orange" for r in rows]
    fig, ax = plt.subplots(figsize=(9, 0.35 * len(rows) + 1.5))
    y = range(len(rows))
    ax.barh(y, [r["images_per_second"] for r in rows], color=colors)
    limits = [(i, r["limit_images_per_second"]) for i, r in enumerate(rows) if r.get("limit_images_per_second")]
    if limits:
        ax.scatter([v for _, v in limits], [i for i, _ in limits], marker="|", s=200, color="black",
                   label="roofline limit")
        ax.legend(loc="upper right", bbox_to_anchor=(1.0, -0.08), fontsize=8, frameon=False)
    ax.set_yticks(list(y), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("training images/s (higher is better)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(out: str, report: Dict, markdown: str, plot_rows: Optional[List[Dict]] = None,
                 title: str = "") -> List[str]:
    """``out``/benchmark.json (the report) and benchmark.md (``markdown``), and with ``plot_rows``
    the bar chart benchmark.png; the paths written."""
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "benchmark.json"), "w") as f:
        json.dump(report, f, indent=2)
    with open(os.path.join(out, "benchmark.md"), "w") as f:
        f.write(markdown)
    written = [os.path.join(out, n) for n in ("benchmark.json", "benchmark.md")]
    if plot_rows is not None:
        try:
            plot(plot_rows, os.path.join(out, "benchmark.png"), title)
            written.append(os.path.join(out, "benchmark.png"))
        except ImportError as e:  # a bare accelerator image may lack matplotlib; keep the measurements
            print(f"no bar chart ({e}); pip install matplotlib to get benchmark.png", file=sys.stderr)
    print(f"\n{markdown}\nwrote {', '.join(written)}")
    return written


def report_header(argv, prog: str = "python -m benchmarks.benchmark") -> Dict:
    """What every report starts with: when, the exact command, how long it has run (``wall_s``, seconds
    since the process loaded this module), the device, versions and commit."""
    import jax
    from bn_jax import provenance
    device = jax.devices()[0]
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": f"{prog} " + " ".join(argv if argv is not None else sys.argv[1:]),
            "wall_s": round(time.monotonic() - STARTED, 1),
            "device": {"platform": device.platform, "kind": device.device_kind, "count": len(jax.devices()),
                       "host": platform.node(), "cpu_count": os.cpu_count()},
            "versions": provenance.versions(), "git": provenance.git_commit()}


