"""JAX's persistent compilation cache for the trainer: a run compiles its initialisation and
steps once per machine and JAX version, and every later run (a resume, a sweep's next seed)
reads them from disk. ResNet-110's jitted initialisation alone takes about 19 s to compile on a
2-core CPU (docs/performance.md, "Set-up"), which is most of a short run's start-up.

JAX keys each entry on the program, its compile options, the backend and the JAX version, so a
stale or foreign entry is never used, only recompiled.
"""

import os
from typing import Optional

import jax

NONE, AUTO = "none", "auto"


def default_dir() -> str:
    """``$XDG_CACHE_HOME/bn_jax/jax`` (``~/.cache/bn_jax/jax`` without it)."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "bn_jax", "jax")


def resolve(option: str) -> Optional[str]:
    """The folder ``--compilation_cache`` means: none turns the cache off; auto keeps a folder the
    environment already gave JAX (``JAX_COMPILATION_CACHE_DIR``), else ``default_dir()``."""
    if option == NONE:
        return None
    if option == AUTO:
        return jax.config.jax_compilation_cache_dir or default_dir()
    return os.path.abspath(os.path.expanduser(option))


def use(option: str) -> Optional[str]:
    """Point JAX's persistent cache at ``resolve(option)`` (or turn it off); returns the folder.
    Call before the first compilation: JAX opens the cache once."""
    folder = resolve(option)
    if folder is not None:
        os.makedirs(folder, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", folder)
    jax.config.update("jax_enable_compilation_cache", folder is not None)
    return folder
