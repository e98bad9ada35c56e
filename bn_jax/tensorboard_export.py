"""Per-epoch metrics as TensorBoard scalars, without TensorFlow (optional: ``pip install bn_jax[tensorboard]``).

Written after the fact from a run's metrics.jsonl by ``python -m experiments.analyze --tensorboard
DIR`` (re-running it refreshes a live run), so the training loop needs no logging hook.
"""

import os
import time
from typing import Dict, Iterable


def write_scalars(logdir: str, records: Iterable[Dict], step_key: str = "epoch") -> int:
    """One scalar per numeric field of each record, at step ``record[step_key]``; the count written."""
    try:
        from tensorboard.compat.proto import event_pb2, summary_pb2
        from tensorboard.summary.writer.event_file_writer import EventFileWriter
    except ImportError as e:
        raise ImportError("TensorBoard export needs the optional dependency: pip install tensorboard") from e
    os.makedirs(logdir, exist_ok=True)
    writer, written = EventFileWriter(logdir), 0
    for record in records:
        values = [summary_pb2.Summary.Value(tag=key, simple_value=float(value)) for key, value in record.items()
                  if key != step_key and isinstance(value, (int, float)) and not isinstance(value, bool)]
        writer.add_event(event_pb2.Event(wall_time=time.time(), step=int(record[step_key]),
                                         summary=summary_pb2.Summary(value=values)))
        written += len(values)
    writer.close()
    return written
