"""metrics.jsonl: one JSON line per epoch, always valid JSON (docs/cli.md, "Output files")."""

import json
import os
from typing import Any, Dict, List

import numpy as np

from bn_jax import workdir as workdir_lib


def json_record(record: Dict[str, Any]) -> str:
    """One metrics line as valid JSON: a NaN or Inf becomes null and its key is listed under
    ``nonfinite`` (a diverged test loss must not make the file unreadable)."""
    bad = [k for k, v in record.items() if isinstance(v, float) and not np.isfinite(v)]
    if bad:
        record = {**{k: (None if k in bad else v) for k, v in record.items()}, "nonfinite": bad}
    return json.dumps(record, allow_nan=False)


def write_metrics(path: str, history: List[Dict[str, Any]]) -> None:
    """Atomically (re)write metrics.jsonl with the epochs a checkpoint has seen."""
    workdir_lib.write_atomic(path, "".join(json_record(record) + "\n" for record in history))


def parse_metrics(lines) -> List[Dict[str, Any]]:
    return [json.loads(line) for line in lines if line.strip()]


def read_metrics(path: str) -> List[Dict[str, Any]]:
    """The records of a metrics.jsonl ([] when there is none yet)."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return parse_metrics(f)


def append_metrics(path: str, record: Dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json_record(record) + "\n")
        f.flush()
        os.fsync(f.fileno())
