"""The one place that decides which parameters train.

A train mode maps each parameter leaf, by its role (``roles``: found from the model's structure,
never from module names), to ``"train"`` or ``"freeze"``.
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

from bn_jax import hashing, names, rng

TRAIN, FREEZE = "train", "freeze"


class UnknownParameter(ValueError):
    """A parameter that no role rule recognises: we refuse to guess whether it trains."""


def _keys(path) -> tuple:
    return tuple(str(getattr(k, "key", k)) for k in path)


def path_name(path, sep: str = ".") -> str:
    """``"Block_0.Conv_0.kernel"`` from a pytree key path (the name hashes and reports use)."""
    return sep.join(_keys(path))


def _module_roles(leaves: Dict[str, Any], has_running_stats: bool) -> Dict[str, str]:
    """Roles of one module's parameters from their structure, or {} when no rule applies.

    A BatchNorm is a module whose parameters are ``scale``/``bias`` and that keeps running
    ``mean``/``var`` in ``batch_stats`` at the same path (whatever it is named); a kernel of rank
    >= 3 is a convolution's, a kernel of rank 2 a dense (output) layer's, each with its bias.
    """
    names = set(leaves)
    if has_running_stats and names <= {"scale", "bias"}:
        return {n: "bn_" + n for n in names}
    if "kernel" in names and names <= {"kernel", "bias"}:
        rank = len(leaves["kernel"].shape)
        if rank >= 3:
            return {"kernel": "conv", **({"bias": "conv_bias"} if "bias" in names else {})}
        if rank == 2:
            return {n: "head_" + n for n in names}
    return {}


def roles(variables):
    """The role of every parameter, a tree shaped like ``variables["params"]``: bn_scale,
    bn_bias, conv (a conv kernel), conv_bias, head_kernel, head_bias (dense layers: in the models
    here, only the output layer). Raises UnknownParameter naming the first leaf no rule covers.

    ``variables``: what ``model.init`` returns (``params`` and ``batch_stats``), arrays or shapes.
    """
    params, stats = variables["params"], variables.get("batch_stats", {})
    stat_paths = {_keys(p) for p, _ in jax.tree_util.tree_leaves_with_path(stats)}
    modules: Dict[tuple, Dict[str, Any]] = {}
    for path, x in jax.tree_util.tree_leaves_with_path(params):
        keys = _keys(path)
        modules.setdefault(keys[:-1], {})[keys[-1]] = x
    found = {}
    for module, leaves in modules.items():
        kept_stats = {module + ("mean",), module + ("var",)} <= stat_paths
        module_roles = _module_roles(leaves, kept_stats)
        for leaf in leaves:
            if leaf not in module_roles:
                raise UnknownParameter(
                    f"no rule says whether parameter {'/'.join(module + (leaf,))} trains: train_modes knows "
                    "BatchNorm (scale/bias with running mean/var in batch_stats), conv and dense "
                    "kernels and their biases")
            found[module + (leaf,)] = module_roles[leaf]
    return jax.tree_util.tree_map_with_path(
        lambda p, _: found[_keys(p)], params)


def role_leaves(variables):
    """[(path, role, leaf)] for every parameter, in tree order."""
    flat = jax.tree_util.tree_leaves_with_path(variables["params"])
    return [(p, r, x) for (p, x), r in zip(flat, jax.tree_util.tree_leaves(roles(variables)))]


def variables_of(state) -> Dict[str, Any]:
    """A train state's ``params`` and ``batch_stats``, as ``model.init`` returns them."""
    return {"params": state.params, "batch_stats": state.batch_stats}


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
names.check_keys(MODES, names.TRAIN_MODES, "train_modes.MODES")

# Roles of which a mode trains only k entries per output channel, not the whole leaf.
PARTIAL = {"random_k": {"conv"}}

# Model constructor options a mode implies (models.create_model keyword arguments).
_MODEL_OPTIONS = {"no_affine": {"affine": False}}


def check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"unknown train mode {mode!r}; known: {', '.join(MODES)}")


def model_options(mode: str) -> Dict[str, Any]:
    check_mode(mode)
    return dict(_MODEL_OPTIONS.get(mode, {}))


def labels(variables, mode: str):
    """The pytree of ``"train"``/``"freeze"`` labels that multi_transform consumes."""
    check_mode(mode)
    is_trainable = MODES[mode]
    return jax.tree_util.tree_map(lambda role: TRAIN if is_trainable(role) else FREEZE, roles(variables))


def trainable_mask(variables, mode: str):
    """Leaf level: True where a leaf receives any update (possibly only at some entries)."""
    return jax.tree_util.tree_map(lambda label: label == TRAIN, labels(variables, mode))


def _is_partial(mode: str, role: str) -> bool:
    return role in PARTIAL.get(mode, ())


def _trained_entries(mode: str, role: str, shape, k: int) -> int:
    if not MODES[mode](role):
        return 0
    if _is_partial(mode, role):  # kernel (..., c_in, c_out): k per output channel
        fan_in = int(np.prod(shape[:-1]))
        return min(k, fan_in) * shape[-1]
    return int(np.prod(shape))


def count(variables, mode: str, k: int = 2):
    """(trainable, total) number of scalars; works on shapes (jax.eval_shape) too."""
    check_mode(mode)
    leaves = role_leaves(variables)
    trainable = sum(_trained_entries(mode, role, x.shape, k) for _, role, x in leaves)
    return trainable, sum(int(np.prod(x.shape)) for _, _, x in leaves)


def describe(variables, mode: str, k: int = 2) -> str:
    trainable, total = count(variables, mode, k)
    return f"trainable {trainable:,} of {total:,} ({100 * trainable / total:.2f}%)"


def _random_k_mask(key, shape, k: int):
    """Boolean mask with exactly min(k, fan_in) True entries per output channel (last axis)."""
    fan_in = int(np.prod(shape[:-1]))
    scores = jax.random.uniform(key, (fan_in, shape[-1]))
    ranks = jnp.argsort(jnp.argsort(scores, axis=0), axis=0)
    return (ranks < k).reshape(shape)


def entry_masks(variables, mode: str, k: int = 2, seed: int = 0):
    """Entry level: a boolean array per leaf, True where that scalar trains."""
    check_mode(mode)
    root = rng.key(seed, "mask")

    def mask(index, role, x):
        if _is_partial(mode, role):
            return _random_k_mask(jax.random.fold_in(root, index), x.shape, k)
        return jnp.full(x.shape, MODES[mode](role))

    treedef = jax.tree_util.tree_structure(variables["params"])
    return jax.tree_util.tree_unflatten(
        treedef, [mask(i, role, x) for i, (_, role, x) in enumerate(role_leaves(variables))])


class EntryMaskState(NamedTuple):
    mask: Any


def keep_entries(masks: Callable[[], Any]) -> optax.GradientTransformation:
    """Zero the updates outside the masks; the mask travels in the state (no baked-in constants).
    ``masks`` makes them when the state is created (a packed step rebuilds the optimizer to update
    states it did not create, and so never draws them)."""

    def init_fn(params):
        # Inside multi_transform, frozen leaves arrive as MaskedNode: keep the same structure.
        return EntryMaskState(jax.tree_util.tree_map(
            lambda p, m: p if isinstance(p, optax.MaskedNode) else m, params, masks(),
            is_leaf=lambda p: isinstance(p, optax.MaskedNode)))

    def update_fn(updates, state, params=None):
        kept = jax.tree_util.tree_map(
            lambda u, m: u if isinstance(u, optax.MaskedNode) else jnp.where(m, u, jnp.zeros_like(u)),
            updates, state.mask, is_leaf=lambda u: isinstance(u, optax.MaskedNode))
        return kept, state

    return optax.GradientTransformation(init_fn, update_fn)


def sgd_on(labels, mode: str, learning_rate, momentum, weight_decay,
           masks: Callable[[], Any] = lambda: None) -> optax.GradientTransformation:
    """SGD with coupled L2 on the leaves ``labels`` train, nothing at all on the frozen ones.

    The hyperparameters may be traced values (a pack's members each bring their own); a Python
    momentum of 0 means plain SGD, whose optimizer state has no momentum buffer."""
    steps = [optax.add_decayed_weights(weight_decay)]
    if mode in PARTIAL:
        steps.append(keep_entries(masks))
    plain = isinstance(momentum, (int, float)) and momentum == 0
    train = optax.chain(*steps, optax.sgd(learning_rate, momentum=None if plain else momentum))
    return optax.multi_transform({TRAIN: train, FREEZE: optax.set_to_zero()}, labels)


def make_optimizer(variables, mode: str, learning_rate, momentum: float = 0.9,
                   weight_decay: float = 1e-4, k: int = 2, seed: int = 0) -> optax.GradientTransformation:
    """SGD with coupled L2 on the trainable leaves (entries), nothing at all on the frozen ones.

    ``variables``: the model's ``params`` and ``batch_stats`` (``model.init``'s result), from
    which ``roles`` tells BatchNorm, conv and dense parameters apart.
    """
    return sgd_on(labels(variables, mode), mode, learning_rate, momentum, weight_decay,
                  masks=lambda: entry_masks(variables, mode, k, seed))


class TrainPlan:
    """What trains in one run, decided once from the model's initial variables (``plan``) and
    handed on with the train state (``TrainState.plan``): the labels the optimizer routes by, the
    counts the run reports, the leaves a small checkpoint stores, and the hash of the frozen
    leaves that such a checkpoint is checked against. Two plans are equal when they freeze the same
    values the same way (mode, k, seed, frozen hash), so a state's compiled steps are shared by
    every state of the same run."""

    def __init__(self, mode: str, k: int, seed: int, labels, trainable: int, total: int, frozen_hash: str):
        self.mode, self.k, self.seed, self.labels = mode, k, seed, labels
        self.trainable, self.total, self.frozen_hash = trainable, total, frozen_hash

    def _key(self):
        return self.mode, self.k, self.seed, self.frozen_hash

    def __eq__(self, other):
        return isinstance(other, TrainPlan) and self._key() == other._key()

    def __hash__(self):
        return hash(self._key())

    def __repr__(self) -> str:
        return f"TrainPlan({self.mode!r}, k={self.k}, seed={self.seed}, {self.describe()})"

    def describe(self) -> str:
        return f"trainable {self.trainable:,} of {self.total:,} ({100 * self.trainable / self.total:.2f}%)"

    def trainable_leaves(self, params) -> Dict[str, Any]:
        """The leaves that train (some entries or all), as a flat {"Block_0.Conv_0.kernel": leaf} dict."""
        flat = jax.tree_util.tree_leaves_with_path(params)
        return {path_name(p): x for (p, x), label in zip(flat, jax.tree_util.tree_leaves(self.labels))
                if label == TRAIN}

    def merge_trainable(self, params, flat: Dict[str, Any]):
        """``params`` with the leaves named in ``flat`` replaced (a small checkpoint's, say)."""
        return jax.tree_util.tree_map_with_path(lambda p, x: flat.get(path_name(p), x), params)


def frozen_hash(params, labels) -> str:
    """SHA-256 of the leaves ``labels`` freeze (names, dtypes, shapes and bytes)."""
    flat = jax.tree_util.tree_leaves_with_path(jax.device_get(params))
    return hashing.hash_arrays((path_name(p), x) for (p, x), label in zip(flat, jax.tree_util.tree_leaves(labels))
                               if label == FREEZE)


def plan(variables, mode: str, k: int = 2, seed: int = 0) -> TrainPlan:
    """The run's TrainPlan, from what ``model.init`` returned (arrays: the frozen hash reads them)."""
    tree = labels(variables, mode)
    trainable, total = count(variables, mode, k)
    return TrainPlan(mode, k, seed, tree, trainable, total, frozen_hash(variables["params"], tree))

