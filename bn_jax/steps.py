"""The pure step functions: one SGD step, one evaluation batch, and their metric sums.

Nothing here is jitted or knows about devices; ``bn_jax.program`` compiles these for a mesh
and ``bn_jax.train`` drives them.
"""

import jax
import jax.numpy as jnp
import optax

from bn_jax import augmentation


def cross_entropy(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def train_step(state, images, labels, key, mean, std, augment: bool = True):
    """One SGD step on a uint8 batch; returns the new state and the batch's summed metrics."""
    if augment:
        images = augmentation.augment(key, images)
    x = augmentation.normalize(images, mean, std)

    def loss_fn(params):
        logits, updates = state.apply_fn({"params": params, "batch_stats": state.batch_stats}, x,
                                         train=True, mutable=["batch_stats"])
        return cross_entropy(logits, labels).mean(), (logits, updates["batch_stats"])

    (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
    metrics = {"loss": loss * labels.shape[0],
               "correct": jnp.sum(jnp.argmax(logits, -1) == labels),
               "count": labels.shape[0]}
    return state, metrics


def top_k_correct(logits, labels, k: int):
    """Per example: whether the label is among the ``k`` highest logits (all of them when there
    are fewer than ``k`` classes)."""
    k = min(k, logits.shape[-1])
    return jnp.any(jax.lax.top_k(logits, k)[1] == labels[:, None], axis=-1)


def eval_step(state, images, labels, valid, mean, std):
    """Summed loss, top-1 and top-5 correct predictions over the valid (non-padding) examples of a
    batch (top-5: the paper reports it for ImageNet)."""
    logits = state.apply_fn({"params": state.params, "batch_stats": state.batch_stats},
                            augmentation.normalize(images, mean, std), train=False)
    return {"loss": jnp.sum(cross_entropy(logits, labels) * valid),
            "correct": jnp.sum((jnp.argmax(logits, -1) == labels) * valid),
            "correct_top5": jnp.sum(top_k_correct(logits, labels, 5) * valid),
            "count": jnp.sum(valid)}


def zero_totals():
    """Per-epoch train metric sums; ``nonfinite_step`` is the first step whose loss was NaN/Inf."""
    return {"loss": jnp.zeros((), jnp.float32), "correct": jnp.zeros((), jnp.int32),
            "count": jnp.zeros((), jnp.int32), "nonfinite_step": jnp.full((), -1, jnp.int32)}


def accumulate(totals, metrics, step):
    """Add a step's metrics to the epoch sums on the device (no host sync)."""
    bad = (totals["nonfinite_step"] < 0) & ~jnp.isfinite(metrics["loss"])
    return {"loss": totals["loss"] + metrics["loss"], "correct": totals["correct"] + metrics["correct"],
            "count": totals["count"] + metrics["count"],
            "nonfinite_step": jnp.where(bad, step, totals["nonfinite_step"])}


def train_step_at(state, totals, data, order, i, step, key, mean, std, *, batch_size: int, augment: bool,
                  sharding=None):
    """Step ``i`` of an epoch whose shuffled order is ``order`` (global step ``step``).

    Gathers the batch from the device-resident ``data`` (images, labels), trains on it and adds
    its metrics to ``totals``; ``i`` and ``step`` may be traced, so one compilation serves all.
    """
    idx = jax.lax.dynamic_slice_in_dim(order, i * batch_size, batch_size)
    images, labels = data[0][idx], data[1][idx]
    if sharding is not None:
        images, labels = jax.lax.with_sharding_constraint((images, labels), sharding)
    state, metrics = train_step(state, images, labels, jax.random.fold_in(key, step), mean, std, augment)
    return state, accumulate(totals, metrics, step)


def train_step_on(state, totals, images, labels, step, mean, std):
    """One step on a batch the host prepared (streamed, already augmented), added to ``totals``."""
    state, metrics = train_step(state, images, labels, None, mean, std, augment=False)
    return state, accumulate(totals, metrics, step)


def train_steps(state, totals, data, order, start, epoch_step, key, mean, std, *, length=None, stop=None, **kw):
    """Steps ``start``…``start + length - 1`` of an epoch as one loop (``epoch_step``: the epoch's
    first step). A static ``length`` lets XLA know the trip count, so the loop need not ask the
    host after every step whether to go on, and it can become a CUDA graph; ``start`` stays
    traced, so one compilation serves every chunk of that length. ``length=None`` runs to a
    traced ``stop`` instead: one compilation for every length, the same steps bit for bit."""
    def body(j, carry):
        return train_step_at(*carry, data, order, start + j, epoch_step + start + j, key, mean, std, **kw)
    return jax.lax.fori_loop(0, length if length is not None else stop - start, body, (state, totals))
