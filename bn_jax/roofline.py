"""How fast could a train step be on this device? A roofline estimate for the benchmark.

A step can go no faster than its arithmetic at the device's matmul rate, nor than its memory
traffic at the device's copy bandwidth. XLA's cost analysis of the compiled step gives both
amounts (FLOPs, and bytes accessed summed over its fused kernels); short timed kernels give the
two rates. The compute bound is optimistic (convolutions rarely reach the large-matmul rate). The
memory bound assumes every kernel's operands and results travel to and from DRAM; where
activations stay in cache (small models on a CPU) a step can beat it, which the report then shows
as more than 100%.
"""

import dataclasses
import re
import time
from typing import Dict, Optional

import jax
import jax.numpy as jnp


@dataclasses.dataclass
class Peaks:
    matmul_flops: float  # FLOP/s of a large square matmul in the compute dtype
    copy_bytes: float  # bytes/s read + written by a large elementwise copy

    def compute_limit(self, flops: float) -> float:
        return self.matmul_flops / flops

    def memory_limit(self, nbytes: float) -> float:
        return self.copy_bytes / nbytes

    def limit(self, flops: Optional[float], nbytes: float) -> float:
        """Items/s at the roofline for work of ``flops`` FLOPs and ``nbytes`` bytes per item
        (the memory bound alone where the FLOPs are unknown)."""
        if flops is None:
            return self.memory_limit(nbytes)
        return min(self.compute_limit(flops), self.memory_limit(nbytes))


def step_cost(compiled) -> Dict[str, Optional[float]]:
    """{"flops", "bytes"} of one call of a compiled function (``jit(f).lower(...).compile()``).

    ``flops`` is None where the backend runs convolutions as cuDNN custom calls: XLA:GPU's cost
    analysis counts no FLOPs for those (measured on an H200: 2.4e7 FLOPs per image for a BN-only
    ResNet-110 step whose convolutions alone do about 1e9), so a compute bound would be wrong.
    """
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):  # older JAX: one dict per device program
        analysis = analysis[0]
    opaque = any(k.startswith("__cudnn$") for k in convolution_counts(compiled.as_text()))
    return {"flops": None if opaque else float(analysis["flops"]), "bytes": float(analysis["bytes accessed"])}


_CONV_CUSTOM_CALL = re.compile(r'custom_call_target="([^"]*conv[^"]*)"', re.IGNORECASE)


def convolution_counts(hlo_text: str) -> Dict[str, int]:
    """Convolutions in a compiled module's HLO text, by how the backend runs them.

    XLA:CPU keeps ``convolution`` instructions; XLA:GPU turns them into cuDNN custom calls
    (``__cudnn$convForward``, ``__cudnn$convBackwardInput``, ``__cudnn$convBackwardFilter``, fused
    variants) and keeps ``convolution`` inside cuDNN fusions. A BN-only step should have no
    weight-gradient (``BackwardFilter``) convolutions at all.
    """
    counts = {}
    plain = len(re.findall(r"\sconvolution\(", hlo_text))
    if plain:
        counts["convolution"] = plain
    for target in _CONV_CUSTOM_CALL.findall(hlo_text):
        counts[target] = counts.get(target, 0) + 1
    return counts


def _best_time(fn, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))  # compile and warm up
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - t)
    return best


def measure_peaks(dtype=jnp.float32, matmul_size: int = None, copy_mib: int = None,
                  repeats: int = 5) -> Peaks:
    """Measured matmul rate and copy bandwidth of the default device (sizes scale with it)."""
    on_cpu = jax.devices()[0].platform == "cpu"
    n = matmul_size or (1024 if on_cpu else 8192)
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    matmul = _best_time(jax.jit(jnp.matmul), a, a, repeats=repeats)
    elements = (copy_mib or (64 if on_cpu else 1024)) * 2**20 // 4
    x = jnp.zeros(elements, jnp.float32)
    copy = _best_time(jax.jit(lambda v: v + 1.0), x, repeats=repeats)  # reads and writes every byte
    return Peaks(matmul_flops=2 * n**3 / matmul, copy_bytes=2 * x.nbytes / copy)
