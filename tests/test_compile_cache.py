"""The trainer's persistent compilation cache: which folder each --compilation_cache means, and
that a second process reads what the first wrote instead of compiling again."""

import json
import os
import subprocess
import sys

import jax
import pytest

from bn_jax import compile_cache

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def cache_dir_setting():
    """Lets a test set JAX's cache folder; puts back the one this process had."""
    before = jax.config.jax_compilation_cache_dir
    yield lambda folder: jax.config.update("jax_compilation_cache_dir", folder)
    jax.config.update("jax_compilation_cache_dir", before)


def test_each_option_names_its_folder(monkeypatch, tmp_path, cache_dir_setting):
    cache_dir_setting(None)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert compile_cache.resolve("auto") == str(tmp_path / "xdg" / "bn_jax" / "jax")
    assert compile_cache.resolve("none") is None
    assert compile_cache.resolve(str(tmp_path / "mine")) == str(tmp_path / "mine")
    cache_dir_setting(str(tmp_path / "from_env"))
    assert compile_cache.resolve("auto") == str(tmp_path / "from_env")  # JAX_COMPILATION_CACHE_DIR wins over auto


CHILD = """
import json, sys, time
import jax, jax.numpy as jnp
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
from bn_jax import compile_cache, models, rng
compile_cache.use(sys.argv[1])
net = models.create_model("resnet8", num_classes=10)
t = time.perf_counter()
variables = models.init_variables(net, rng.key(0, "init"), (8, 8, 3))
leaf = jax.tree_util.tree_leaves(variables["params"])[0]
print(json.dumps({"sum": float(jnp.sum(leaf))}))
"""


@pytest.mark.slow
def test_a_second_process_reads_the_compiled_initialisation_from_the_cache(tmp_path):
    cache = tmp_path / "cache"

    def child():
        out = subprocess.run([sys.executable, "-c", CHILD, str(cache)], cwd=ROOT, capture_output=True, text=True,
                             timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout.splitlines()[-1])

    def entries():
        return {name: os.stat(cache / name).st_mtime_ns for name in os.listdir(cache)}

    first = child()
    written = entries()
    assert written  # the initialisation was written
    second = child()
    assert second == first
    assert entries() == written  # read: no entry added, none written again
