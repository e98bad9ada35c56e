"""What produced a result: library versions, the platform, and the code's git commit.

Saved with every run's summary and every benchmark, so a number can be traced to the code and
the releases that made it.
"""

import functools
import importlib.metadata
import os
import platform
import subprocess
from typing import Dict, Optional

# distributions, read from their metadata: nothing is imported (torch would take seconds)
PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", "torch")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@functools.lru_cache(maxsize=None)
def _read_versions() -> Dict[str, Optional[str]]:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def versions() -> Dict[str, Optional[str]]:
    """Python and each package's version (None where not installed); read once per process,
    since every checkpoint records them."""
    return dict(_read_versions())


def git_commit() -> Optional[Dict[str, object]]:
    """{"commit", "dirty"} of the checkout this code runs from, or None outside a git checkout."""
    def git(*args):
        return subprocess.run(["git", "-C", ROOT, *args], capture_output=True, text=True, timeout=10)
    try:
        head = git("rev-parse", "HEAD")
        if head.returncode != 0:
            return None
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": head.stdout.strip(), "dirty": bool(dirty.stdout.strip())}


def provenance() -> Dict[str, object]:
    return {"versions": versions(), "platform": platform.platform(), "git": git_commit()}
