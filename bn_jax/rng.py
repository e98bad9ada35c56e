"""The random keys of a run, each a function of its seed and a tag from one table.

Everything random in a run (the initialisation, each step's augmentation, each epoch's order,
``random_k``'s entry masks) comes from ``jax.random.key(seed)`` folded with one of these tags,
so that a run can be replayed from any step and one stream never reuses another's bits. A
streamed run (ImageNet) draws its epoch order on the host with NumPy, seeded from
``[seed, epoch, STREAM_ORDER_TAG]`` (NumPy's generator is stable across versions).
"""

import jax

TAGS = {"init": 0, "augment": 1, "mask": 2, "order": 3}
STREAM_ORDER_TAG = 7


def key(seed: int, purpose: str):
    """The key of ``purpose`` (a ``TAGS`` name) in the run seeded ``seed``."""
    return jax.random.fold_in(jax.random.key(seed), TAGS[purpose])
