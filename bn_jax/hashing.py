"""SHA-256 over named arrays: the fingerprints that tie a checkpoint to its data, its epoch order
and its frozen weights. NumPy only, so that a dataset can fingerprint itself."""

import hashlib

import numpy as np


def hash_arrays(named_arrays) -> str:
    """Hex SHA-256 over (name, array) pairs: names, dtypes, shapes and bytes, in order."""
    h = hashlib.sha256()
    for name, a in named_arrays:
        a = np.ascontiguousarray(np.asarray(a))
        h.update(f"{name}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def order_hash(order: np.ndarray) -> str:
    return hash_arrays([("order", order)])
