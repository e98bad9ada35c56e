"""Pack members against the same runs trained alone: ``python -m benchmarks.pack_vs_solo
--pack_root A --solo_root B --out DIR``.

A and B each hold run folders of the same names (a pack's members, ``experiments.cifar --seeds``,
and the same runs trained one by one with ``--seed``, ``--workdir B/<name>``). Writes
DIR/pack_vs_solo.json and .md: per run, the final and best test accuracy of both, and the largest
difference of any epoch's train loss, test loss and test accuracy between them.
"""

import argparse
import json
import os
import sys
from typing import Dict, List

KEYS = ("train_loss", "test_loss", "test_accuracy")


def read(folder: str):
    with open(os.path.join(folder, "summary.json")) as f:
        summary = json.load(f)
    with open(os.path.join(folder, "metrics.jsonl")) as f:
        return summary, [json.loads(line) for line in f if line.strip()]


def compare(pack_root: str, solo_root: str) -> List[Dict]:
    """One row per run folder found finished in both roots, in name order."""
    rows = []
    for name in sorted(os.listdir(pack_root)):
        member, solo = os.path.join(pack_root, name), os.path.join(solo_root, name)
        if not (os.path.exists(os.path.join(member, "summary.json")) and os.path.exists(os.path.join(solo, "summary.json"))):
            continue
        (ps, pm), (ss, sm) = read(member), read(solo)
        if len(pm) != len(sm):
            raise ValueError(f"{name}: {len(pm)} epochs in the pack, {len(sm)} alone")
        rows.append({"run": name, "epochs": len(pm),
                     "pack_final_test_accuracy": ps["final_test_accuracy"], "solo_final_test_accuracy": ss["final_test_accuracy"],
                     "pack_best_test_accuracy": ps["best_test_accuracy"], "solo_best_test_accuracy": ss["best_test_accuracy"],
                     **{f"max_abs_diff_{k}": max(abs(a[k] - b[k]) for a, b in zip(pm, sm)) for k in KEYS}})
    return rows


def markdown(rows: List[Dict]) -> str:
    lines = ["| run | epochs | final acc: pack | alone | best acc: pack | alone | max |Δ| train loss | "
             "max |Δ| test loss | max |Δ| test acc |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['run']} | {r['epochs']} | {100 * r['pack_final_test_accuracy']:.2f}% | "
                     f"{100 * r['solo_final_test_accuracy']:.2f}% | {100 * r['pack_best_test_accuracy']:.2f}% | "
                     f"{100 * r['solo_best_test_accuracy']:.2f}% | {r['max_abs_diff_train_loss']:.2e} | "
                     f"{r['max_abs_diff_test_loss']:.2e} | {r['max_abs_diff_test_accuracy']:.4f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.pack_vs_solo", description=__doc__.split("\n\n")[0])
    p.add_argument("--pack_root", required=True, help="folder of a pack's member run folders")
    p.add_argument("--solo_root", required=True, help="folder of the same runs trained alone (same folder names)")
    p.add_argument("--out", required=True, help="folder for pack_vs_solo.json and pack_vs_solo.md")
    args = p.parse_args(argv)
    try:
        rows = compare(args.pack_root, args.solo_root)
    except (OSError, ValueError, KeyError) as e:
        p.error(str(e))
    if not rows:
        p.error(f"no run finished in both {args.pack_root} and {args.solo_root}")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "pack_vs_solo.json"), "w") as f:
        json.dump({"command": "python -m benchmarks.pack_vs_solo " + " ".join(argv if argv is not None else sys.argv[1:]),
                   "rows": rows}, f, indent=2)
    with open(os.path.join(args.out, "pack_vs_solo.md"), "w") as f:
        f.write(markdown(rows))
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
