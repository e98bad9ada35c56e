"""The one place that decides which parameters train.

A train mode maps each parameter leaf, by its role, to ``"train"`` or ``"freeze"``.
``optax.multi_transform`` routes ``"freeze"`` leaves to ``optax.set_to_zero()``, so they keep
their initial value to the bit and carry no optimizer state; because nothing else reads their
gradients, XLA also drops the weight-gradient convolutions that would compute them.
Weight decay lives inside the ``"train"`` branch, so it touches trainable leaves only.

Two modes need more than a leaf-level choice:

* ``random_k`` (the paper's "random parameters" baseline; the authors' public code does not
  include it, so this is our reading): in every conv kernel, k entries per output channel, drawn
  uniformly without replacement from that channel's kh·kw·c_in weights (all of them where
  fan-in < k), train; so does the output layer (kernel and bias). BatchNorm γ/β and VGG conv
  biases stay frozen. With k = 2 a ResNet has exactly as many trainable conv weights as BN
  parameters. The selection is a pure function of ``seed`` (a key independent of the init key)
  and is kept in the optimizer state. Inside the ``"train"`` branch the entry mask is applied
  after weight decay and before SGD, so a masked-out entry's update and momentum are exactly zero
  (its weight stays bit-identical and decay never reaches it).
* ``no_affine`` (the paper's Figure 1 ablation): the model is built without γ and β
  (``model_options``); everything that remains trains.

Adding a mode is adding a predicate to ``MODES``; the train step never changes.
"""

from typing import Any, Callable, Dict, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

TRAIN, FREEZE = "train", "freeze"


def leaf_role(path) -> str:
    """Role of a parameter from its tree path: bn_scale, bn_bias, head_kernel, head_bias,
    conv (a conv kernel) or conv_bias (VGG's conv biases)."""
    names = [getattr(k, "key", str(k)) for k in path]
    module, leaf = names[-2], names[-1]
    if module.startswith("BatchNorm"):
        return "bn_" + leaf  # scale / bias
    if module == "head":
        return "head_" + leaf  # kernel / bias
    return "conv_bias" if leaf == "bias" else "conv"


_BN = {"bn_scale", "bn_bias"}
_HEAD = {"head_kernel", "head_bias"}

MODES: Dict[str, Callable[[str], bool]] = {
    "full": lambda role: True,
    "bn": lambda role: role in _BN,
    "bn_output": lambda role: role in _BN | _HEAD,
    "output": lambda role: role in _HEAD,
    "gamma_only": lambda role: role == "bn_scale",
    "beta_only": lambda role: role == "bn_bias",
    "random_k": lambda role: role == "conv" or role in _HEAD,
    "no_affine": lambda role: True,
}

# Roles of which a mode trains only k entries per output channel, not the whole leaf.
PARTIAL = {"random_k": {"conv"}}

# Model constructor options a mode implies (models.create_model keyword arguments).
_MODEL_OPTIONS = {"no_affine": {"affine": False}}

_MASK_TAG = 2  # folded into the seed's key: init uses 0, augmentation 1 (train.run_keys)


def check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"unknown train mode {mode!r}; known: {', '.join(MODES)}")


def model_options(mode: str) -> Dict[str, Any]:
    check_mode(mode)
    return dict(_MODEL_OPTIONS.get(mode, {}))


def labels(params, mode: str):
    """The pytree of ``"train"``/``"freeze"`` labels that multi_transform consumes."""
    check_mode(mode)
    is_trainable = MODES[mode]
    return jax.tree_util.tree_map_with_path(
        lambda path, _: TRAIN if is_trainable(leaf_role(path)) else FREEZE, params)


def trainable_mask(params, mode: str):
    """Leaf level: True where a leaf receives any update (possibly only at some entries)."""
    return jax.tree_util.tree_map(lambda label: label == TRAIN, labels(params, mode))


def _is_partial(mode: str, role: str) -> bool:
    return role in PARTIAL.get(mode, ())


def _trained_entries(mode: str, role: str, shape, k: int) -> int:
    if not MODES[mode](role):
        return 0
    if _is_partial(mode, role):  # kernel (..., c_in, c_out): k per output channel
        fan_in = int(np.prod(shape[:-1]))
        return min(k, fan_in) * shape[-1]
    return int(np.prod(shape))


def count(params, mode: str, k: int = 2):
    """(trainable, total) number of scalars; works on shapes (jax.eval_shape) too."""
    check_mode(mode)
    leaves = jax.tree_util.tree_leaves_with_path(params)
    trainable = sum(_trained_entries(mode, leaf_role(p), x.shape, k) for p, x in leaves)
    return trainable, sum(int(np.prod(x.shape)) for _, x in leaves)


def describe(params, mode: str, k: int = 2) -> str:
    trainable, total = count(params, mode, k)
    return f"trainable {trainable:,} of {total:,} ({100 * trainable / total:.2f}%)"


def _random_k_mask(key, shape, k: int):
    """Boolean mask with exactly min(k, fan_in) True entries per output channel (last axis)."""
    fan_in = int(np.prod(shape[:-1]))
    scores = jax.random.uniform(key, (fan_in, shape[-1]))
    ranks = jnp.argsort(jnp.argsort(scores, axis=0), axis=0)
    return (ranks < k).reshape(shape)


def entry_masks(params, mode: str, k: int = 2, seed: int = 0):
    """Entry level: a boolean array per leaf, True where that scalar trains."""
    check_mode(mode)
    root = jax.random.fold_in(jax.random.key(seed), _MASK_TAG)

    def mask(index, path, x):
        role = leaf_role(path)
        if _is_partial(mode, role):
            return _random_k_mask(jax.random.fold_in(root, index), x.shape, k)
        return jnp.full(x.shape, MODES[mode](role))

    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    return jax.tree_util.tree_unflatten(treedef, [mask(i, p, x) for i, (p, x) in enumerate(leaves)])


class EntryMaskState(NamedTuple):
    mask: Any


def keep_entries(masks) -> optax.GradientTransformation:
    """Zero the updates outside ``masks``; the mask travels in the state (no baked-in constants)."""

    def init_fn(params):
        # Inside multi_transform, frozen leaves arrive as MaskedNode: keep the same structure.
        return EntryMaskState(jax.tree_util.tree_map(
            lambda p, m: p if isinstance(p, optax.MaskedNode) else m, params, masks,
            is_leaf=lambda p: isinstance(p, optax.MaskedNode)))

    def update_fn(updates, state, params=None):
        kept = jax.tree_util.tree_map(
            lambda u, m: u if isinstance(u, optax.MaskedNode) else jnp.where(m, u, jnp.zeros_like(u)),
            updates, state.mask, is_leaf=lambda u: isinstance(u, optax.MaskedNode))
        return kept, state

    return optax.GradientTransformation(init_fn, update_fn)


def make_optimizer(params, mode: str, learning_rate, momentum: float = 0.9,
                   weight_decay: float = 1e-4, k: int = 2, seed: int = 0) -> optax.GradientTransformation:
    """SGD with coupled L2 on the trainable leaves (entries), nothing at all on the frozen ones."""
    steps = [optax.add_decayed_weights(weight_decay)]
    if mode in PARTIAL:
        steps.append(keep_entries(entry_masks(params, mode, k, seed)))
    train = optax.chain(*steps, optax.sgd(learning_rate, momentum=momentum or None))
    return optax.multi_transform({TRAIN: train, FREEZE: optax.set_to_zero()}, labels(params, mode))
