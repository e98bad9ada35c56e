"""Metrics as TensorBoard scalars, without TensorFlow (optional: ``pip install bn_jax[tensorboard]``).

Written while a run trains by the trainer's ``--tensorboard DIR`` (``hooks.TensorBoard``), or
after the fact from a run's metrics.jsonl by ``python -m experiments.analyze --tensorboard DIR``.
"""

import os
import time
from typing import Dict, Iterable


class ScalarWriter:
    """An event file of scalars, flushed after every write, so TensorBoard shows a run as it trains."""

    def __init__(self, logdir: str):
        try:
            from tensorboard.summary.writer.event_file_writer import EventFileWriter
        except ImportError as e:
            raise ImportError("TensorBoard scalars need the optional dependency: pip install tensorboard") from e
        os.makedirs(logdir, exist_ok=True)
        self.writer = EventFileWriter(logdir)

    def write(self, step: int, values: Dict[str, float]) -> int:
        """One scalar per numeric entry of ``values`` at ``step``; the count written."""
        from tensorboard.compat.proto import event_pb2, summary_pb2
        scalars = [summary_pb2.Summary.Value(tag=key, simple_value=float(value)) for key, value in values.items()
                   if isinstance(value, (int, float)) and not isinstance(value, bool)]
        self.writer.add_event(event_pb2.Event(wall_time=time.time(), step=int(step),
                                              summary=summary_pb2.Summary(value=scalars)))
        self.writer.flush()
        return len(scalars)

    def close(self) -> None:
        self.writer.close()


def write_scalars(logdir: str, records: Iterable[Dict], step_key: str = "epoch") -> int:
    """One scalar per numeric field of each record, at step ``record[step_key]``; the count written."""
    writer, written = ScalarWriter(logdir), 0
    for record in records:
        written += writer.write(record[step_key], {k: v for k, v in record.items() if k != step_key})
    writer.close()
    return written
