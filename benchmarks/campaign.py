"""A campaign: the paper's runs in a fixed order, advanced a GPU call at a time.

``docs/results/campaign.json`` lists the runs (model, width, train mode, k) in order of evidence
per GPU-minute. Each call of ``python -m benchmarks.gpu_check --stages campaign`` trains the
first unfinished ones until its deadline, where the trainer checkpoints and stops as it does for
SIGTERM, and packs every run folder (small checkpoints) into one archive in its output folder;
the next call unpacks it (``--resume_campaign``) and goes on from the newest checkpoints.
"""

import json
import os
import tarfile
from typing import Any, Dict, List

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT = os.path.join(ROOT, "docs", "results", "campaign.json")
ARCHIVE = "campaign.tar.gz"
MAX_ARCHIVE_BYTES = 16 * 2**20  # what one file of a GPU call's output may hold
RUN_FIELDS = ("model", "width", "train_mode", "k", "epochs", "batch_size")


def load(path: str, epochs: int = None, batch_size: int = None) -> List[Dict[str, Any]]:
    """The campaign's runs, each {"config": ExperimentConfig, "why", "archive"}; ValueError naming
    the entry for a field we do not know or a config that does not validate, and for a run twice.
    ``epochs``/``batch_size`` override the file's (the smoke test's tiny sizes)."""
    from bn_jax.config import ExperimentConfig, run_name
    with open(path) as f:
        spec = json.load(f)
    out, names = [], set()
    for i, entry in enumerate(spec["runs"]):
        unknown = set(entry) - set(RUN_FIELDS) - {"why", "archive"}
        if unknown:
            raise ValueError(f"{path}: run {i + 1} has unknown fields {', '.join(sorted(unknown))}")
        fields = {"epochs": epochs or spec.get("epochs", 160), "batch_size": batch_size or spec.get("batch_size", 128),
                  **{k: entry[k] for k in RUN_FIELDS if k in entry and k not in ("epochs", "batch_size")}}
        try:
            config = ExperimentConfig(**fields).validate()
        except ValueError as e:
            raise ValueError(f"{path}: run {i + 1}: {e}") from None
        if run_name(config) in names:
            raise ValueError(f"{path}: run {i + 1} ({run_name(config)}) is listed twice")
        names.add(run_name(config))
        archive = entry.get("archive")  # an earlier run's folder, relative to the checkout
        out.append({"config": config, "why": entry.get("why", ""),
                    "archive": archive and os.path.join(ROOT, archive)})
    return out


def pack(root: str, out: str) -> str:
    """Every run folder under ``root`` into ``out/campaign.tar.gz``; ValueError (the file removed)
    if it outgrows what one returned file may hold."""
    path = os.path.join(out, ARCHIVE)
    with tarfile.open(path + ".tmp", "w:gz") as tar:
        for name in sorted(os.listdir(root)):
            tar.add(os.path.join(root, name), arcname=name)
    size = os.path.getsize(path + ".tmp")
    if size > MAX_ARCHIVE_BYTES:
        os.remove(path + ".tmp")
        raise ValueError(f"the campaign archive would hold {size / 2**20:.1f} MiB, over {MAX_ARCHIVE_BYTES / 2**20:.0f}")
    os.replace(path + ".tmp", path)
    return path


def unpack(archive: str, root: str) -> None:
    """An earlier call's archive into ``root``, which must not hold run folders yet."""
    if os.path.isdir(root) and os.listdir(root):
        raise ValueError(f"--resume_campaign: {root} holds runs already; remove it first")
    os.makedirs(root, exist_ok=True)
    with tarfile.open(archive) as tar:
        tar.extractall(root, filter="data")
