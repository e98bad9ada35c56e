"""The one place that decides which parameters train.

A train mode maps each parameter leaf, by its role, to ``"train"`` or ``"freeze"``.
``optax.multi_transform`` routes ``"freeze"`` leaves to ``optax.set_to_zero()``, so they keep
their initial value to the bit and carry no optimizer state; because nothing else reads their
gradients, XLA also drops the weight-gradient convolutions that would compute them.
Weight decay lives inside the ``"train"`` branch, so it touches trainable leaves only.

Adding a mode is adding a predicate to ``MODES``; the train step never changes.
"""

from typing import Callable, Dict

import jax
import optax

TRAIN, FREEZE = "train", "freeze"


def leaf_role(path) -> str:
    """Role of a parameter from its tree path: bn_scale, bn_bias, head_kernel, head_bias, conv."""
    names = [getattr(k, "key", str(k)) for k in path]
    module, leaf = names[-2], names[-1]
    if module.startswith("BatchNorm"):
        return "bn_" + leaf  # scale / bias
    if module == "head":
        return "head_" + leaf  # kernel / bias
    return "conv"


_BN = {"bn_scale", "bn_bias"}
_HEAD = {"head_kernel", "head_bias"}

MODES: Dict[str, Callable[[str], bool]] = {
    "full": lambda role: True,
    "bn": lambda role: role in _BN,
    "bn_output": lambda role: role in _BN | _HEAD,
    "output": lambda role: role in _HEAD,
    "gamma_only": lambda role: role == "bn_scale",
    "beta_only": lambda role: role == "bn_bias",
}


def check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"unknown train mode {mode!r}; known: {', '.join(MODES)}")


def labels(params, mode: str):
    """The pytree of ``"train"``/``"freeze"`` labels that multi_transform consumes."""
    check_mode(mode)
    is_trainable = MODES[mode]
    return jax.tree_util.tree_map_with_path(
        lambda path, _: TRAIN if is_trainable(leaf_role(path)) else FREEZE, params)


def trainable_mask(params, mode: str):
    return jax.tree_util.tree_map(lambda label: label == TRAIN, labels(params, mode))


def count(params, mode: str):
    """(trainable, total) number of scalars."""
    mask = trainable_mask(params, mode)
    sizes = jax.tree_util.tree_leaves(jax.tree_util.tree_map(lambda p: p.size, params))
    flags = jax.tree_util.tree_leaves(mask)
    return sum(s for s, f in zip(sizes, flags) if f), sum(sizes)


def describe(params, mode: str) -> str:
    trainable, total = count(params, mode)
    return f"trainable {trainable:,} of {total:,} ({100 * trainable / total:.2f}%)"


def make_optimizer(params, mode: str, learning_rate, momentum: float = 0.9,
                   weight_decay: float = 1e-4) -> optax.GradientTransformation:
    """SGD with coupled L2 on the trainable leaves, nothing at all on the frozen ones."""
    train = optax.chain(
        optax.add_decayed_weights(weight_decay),
        optax.sgd(learning_rate, momentum=momentum or None),
    )
    return optax.multi_transform({TRAIN: train, FREEZE: optax.set_to_zero()}, labels(params, mode))
