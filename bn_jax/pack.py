"""K runs trained as one program: their states stacked on a leading axis, one step ``jax.vmap``-ed
over it (``bn_jax.pack_config`` says which runs may share a pack; ``bn_jax.pack_run`` runs one).

Each member is created exactly as the same run alone (``train.create_train_state``), so its
frozen weights are the solo run's to the bit; its epoch order and augmentation key come from its
own seed, its learning rate, momentum and weight decay are its own numbers (the optimizer is
rebuilt inside the mapped step from them, so the optimizer state keeps the solo run's structure).

How the frozen weights travel decides what the convolutions become:

* per member (members with other initial weights): each member's kernels are mapped, and
  ``vmap`` turns every convolution into one grouped convolution (``feature_group_count = K``);
* shared (every member froze the same values: ``--share_init``, or members that differ only in
  their optimizer settings): the frozen leaves enter the mapped step unmapped, and ``vmap``
  folds the members into the batch of one convolution over K batches.
"""

import functools
from typing import Any, Dict, List, Sequence

import jax
import jax.numpy as jnp

from bn_jax import parallel, rng, steps, train, train_modes
from bn_jax import program as program_lib
from bn_jax.config import ExperimentConfig, RuntimeConfig


def stack(trees: Sequence[Any]):
    """One tree whose leaves hold ``trees``' leaves along a new leading axis; static fields (a
    train state's optimizer and plan) are the first tree's."""
    treedef = jax.tree_util.tree_structure(trees[0])
    leaves = [jax.tree_util.tree_leaves(t) for t in trees]
    return jax.tree_util.tree_unflatten(treedef, [jnp.stack(ls) for ls in zip(*leaves)])


def member_of(tree, m: int):
    """Member ``m``'s slice of a stacked tree (arrays on the device, or read back)."""
    return jax.tree_util.tree_map(lambda x: x[m], tree)


def lr_table(config: ExperimentConfig, steps_per_epoch: int) -> jnp.ndarray:
    """The member's learning rate at every optimizer count: its own schedule, evaluated once."""
    total = config.epochs * steps_per_epoch
    return jax.jit(jax.vmap(train.make_schedule(config, steps_per_epoch)))(jnp.arange(total + 1))


class Pack:
    """The members' fresh states and what the mapped step needs to treat each as its own run."""

    def __init__(self, configs: Sequence[ExperimentConfig], num_classes: int, image_shape, steps_per_epoch: int,
                 members: str = "auto", platform: str = None, shared: bool = None):
        self.configs, self.num_classes, self.image_shape = list(configs), num_classes, image_shape
        self.members_option = members
        self.fresh = [train.create_train_state(c, num_classes, image_shape, steps_per_epoch) for c in configs]
        plan = self.fresh[0].plan
        if shared is None:  # (given: a smaller pack measured for a larger one keeps the larger's program)
            shared = len({s.plan.frozen_hash for s in self.fresh}) == 1 and plan.trainable < plan.total
        self.shared = shared
        self.sequential = resolve_members(members, platform or jax.devices()[0].platform) == "sequential"
        self.plain_sgd = all(c.momentum == 0 for c in configs)
        self.hyper = stack([{"lr": lr_table(c, steps_per_epoch), "momentum": jnp.float32(c.momentum),
                             "weight_decay": jnp.float32(c.weight_decay)} for c in configs])
        # vmap's in_axes for a packed state: frozen leaves unmapped when every member shares them
        frozen = jax.tree_util.tree_map(lambda label: self.shared and label == train_modes.FREEZE, plan.labels)
        self._frozen = frozen
        axes = jax.tree_util.tree_map(lambda _: 0, self.fresh[0])
        self.state_axes = axes.replace(params=jax.tree_util.tree_map(lambda f: None if f else 0, frozen))

    @property
    def size(self) -> int:
        return len(self.configs)

    def describe(self) -> str:
        if self.sequential:
            how = "members one after another in each compiled step"
        elif self.shared:
            how = "frozen weights shared: each convolution runs once over all members' batches"
        else:
            how = "frozen weights per member: each convolution runs grouped, one group per member"
        return f"pack of {self.size} run{'s' if self.size > 1 else ''} ({how})"

    def initial_state(self):
        return stack(self.fresh)

    def member_state(self, packed, m: int):
        """Member ``m`` of a packed state, as its solo run's train state (its optimizer and plan)."""
        return member_of(packed, m).replace(tx=self.fresh[m].tx, plan=self.fresh[m].plan)

    def mapped(self, state):
        """``state`` with the shared frozen leaves taken once (member 0's), for ``state_axes``."""
        params = jax.tree_util.tree_map(lambda x, f: x[0] if f else x, state.params, self._frozen)
        return state.replace(params=params)

    def optimizer(self, hyper):
        """A member's optimizer from its (traced) numbers: the solo run's, with a table for a schedule."""
        plan = self.fresh[0].plan
        return train_modes.sgd_on(plan.labels, plan.mode, lambda count: hyper["lr"][count],
                                  0.0 if self.plain_sgd else hyper["momentum"], hyper["weight_decay"])


def packed_step_at(state, totals, hyper, data, orders, i, step, keys, mean, std, *, pack: Pack, **kw):
    """Step ``i`` of every member (``steps.train_step_at`` mapped over the pack): vmapped, or
    the members one after another in the same program (``Pack.sequential``)."""
    def one(member, member_totals, member_hyper, order, key):
        trained, member_totals = steps.train_step_at(member.replace(tx=pack.optimizer(member_hyper)), member_totals,
                                                     data, order, i, step, key, mean, std, **kw)
        return trained.replace(tx=member.tx), member_totals
    if pack.sequential:  # unrolled: XLA's CPU convolutions inside a loop body are slow (see program.py)
        return jax.lax.scan(lambda _, xs: (None, one(*xs)), None, (state, totals, hyper, orders, keys),
                            unroll=True)[1]
    return jax.vmap(one, in_axes=(pack.state_axes, 0, 0, 0, 0))(pack.mapped(state), totals, hyper, orders, keys)


def resolve_members(members: str, platform: str) -> str:
    """``vmap`` or ``sequential``: auto maps the members with vmap, except on a CPU. There XLA's
    grouped convolutions (members with their own weights) ran 4–6× slower than the members'
    convolutions one after another, and even one convolution over the joined batch (shared
    weights) was slower at 8 members (docs/performance.md, "CPU: packs")."""
    if members != "auto":
        return members
    return "sequential" if platform == "cpu" else "vmap"


def packed_steps(state, totals, hyper, data, orders, start, epoch_step, keys, mean, std, *, length=None, stop=None,
                 **kw):
    """Steps ``start``…``start + length - 1`` (or to a traced ``stop``) of every member as one loop
    (the fused loop; see ``steps.train_steps``)."""
    def body(j, carry):
        return packed_step_at(*carry, hyper, data, orders, start + j, epoch_step + start + j, keys, mean, std, **kw)
    return jax.lax.fori_loop(0, length if length is not None else stop - start, body, (state, totals))


def packed_eval_step(state, images, labels, valid, mean, std, *, pack: Pack):
    """Every member's test sums on one batch, in one call."""
    if pack.sequential:
        return jax.lax.scan(lambda _, member: (None, steps.eval_step(member, images, labels, valid, mean, std)),
                            None, state, unroll=True)[1]
    return jax.vmap(steps.eval_step, in_axes=(pack.state_axes, None, None, None, None, None))(
        pack.mapped(state), images, labels, valid, mean, std)


def jit_pack_steps(pack: Pack, config: ExperimentConfig, loop: str, mesh):
    """The loop's jitted pack step: ``fused`` runs a range of steps, ``step`` exactly one; both take
    ``(state, totals, hyper, data, orders, start, stop, epoch_step, keys, mean, std)``."""
    kw = dict(pack=pack, batch_size=config.batch_size, augment=config.augment,
              sharding=None if mesh is None else parallel.sharded(mesh))
    out = None if mesh is None else parallel.replicated(mesh)
    if loop == "fused":
        return program_lib.FixedLengthLoop(functools.partial(packed_steps, **kw), start_at=5, out_shardings=out)
    step = jax.jit(functools.partial(packed_step_at, **kw), donate_argnums=0, out_shardings=out)
    return lambda state, totals, hyper, data, orders, start, stop, epoch_step, keys, mean, std: step(
        state, totals, hyper, data, orders, start, epoch_step + start, keys, mean, std)


class PackProgram:
    """A device-resident program (``program.DeviceResidentProgram``: one copy of the data, its
    normalisation and test batches) that trains and evaluates every member of ``pack`` per call."""

    def __init__(self, pack: Pack, runtime: RuntimeConfig, data, mesh):
        self.pack, self.mesh = pack, mesh
        self.base = program_lib.DeviceResidentProgram(pack.configs[0], runtime, data, mesh)
        self.loop, self.steps_per_epoch = self.base.loop, self.base.steps_per_epoch
        self.max_steps_per_call = self.base.max_steps_per_call
        self.member_batch_size = pack.configs[0].batch_size
        self.batch_size = pack.size * self.member_batch_size  # images per step, all members
        self.augment_keys = [rng.key(c.seed, "augment") for c in pack.configs]
        self.order_keys = [rng.key(c.seed, "order") for c in pack.configs]
        self.keys = self.put(jnp.stack(self.augment_keys))
        self.hyper = self.put(pack.hyper)
        self.steps_fn = jit_pack_steps(pack, pack.configs[0], self.loop, mesh)
        self.eval_fn = jax.jit(functools.partial(packed_eval_step, pack=pack))
        self.scan_eval_fn = jax.jit(functools.partial(program_lib.scan_eval,
                                                      eval_step=functools.partial(packed_eval_step, pack=pack)))
        self.input = program_lib.ResidentInput()
        self._orders = (None, None)

    def put(self, tree):
        return self.base.put(tree)

    def zero_totals(self):
        return self.put(stack([steps.zero_totals()] * self.pack.size))

    def member_order(self, m: int, epoch: int):
        """Member ``m``'s order of ``epoch``: the solo run's (the same jitted permutation of its key)."""
        return self.base.order_fn(self.order_keys[m], epoch)

    def orders(self, epoch: int):
        if self._orders[0] != epoch:
            self._orders = (epoch, jnp.stack([self.member_order(m, epoch) for m in range(self.pack.size)]))
        return self._orders[1]

    def run(self, state, totals, epoch: int, start: int, stop: int):
        return self.steps_fn(state, totals, self.hyper, self.base.train_data, self.orders(epoch), start, stop,
                             epoch * self.steps_per_epoch, self.keys, self.base.mean, self.base.std)

    def compile(self, state, totals, stop: int = 1, members: int = None):
        """The call ``run(state, totals, 0, 0, stop)`` compiled ahead of time (the fused loop then
        runs this executable); its memory analysis is what ``pack_run.check_memory`` reads.
        ``members``: compile it instead for a pack of the first few members (only measured)."""
        fn, hyper, orders, keys = self.steps_fn, self.hyper, self.orders(0), self.keys
        if members is not None:
            sub = Pack(self.pack.configs[:members], self.pack.num_classes, self.pack.image_shape,
                       self.steps_per_epoch, self.pack.members_option, shared=self.pack.shared)
            fn = jit_pack_steps(sub, sub.configs[0], self.loop, self.mesh)
            state = self.put(sub.initial_state())  # (its own optimizer and plan: static in the state)
            totals, hyper, orders, keys = (jax.tree_util.tree_map(lambda x: x[:members], t)
                                           for t in (totals, hyper, orders, keys))
        args = (state, totals, hyper, self.base.train_data, orders, 0, stop, 0, keys, self.base.mean, self.base.std)
        if self.loop != "fused":
            return jax.jit(fn).lower(*args).compile()
        return fn.compile(*args) if members is None else fn.lower(*args).compile()

    def evaluate(self, state) -> List[Dict[str, float]]:
        """Every member's test metrics, each test batch scored for all members in one call (the
        fused loop: the whole test set in one call, as ``program.DeviceResidentProgram`` does)."""
        totals = None
        if self.loop == "fused":
            totals = self.scan_eval_fn(state, *self.base.test_stack, self.base.mean, self.base.std)
        for images, labels, valid in self.base.test_batches if totals is None else ():
            m = self.eval_fn(state, images, labels, valid, self.base.mean, self.base.std)
            totals = m if totals is None else jax.tree_util.tree_map(lambda a, b: a + b, totals, m)
        host = jax.device_get(totals)
        return [program_lib.test_metrics(member_of(host, m)) for m in range(self.pack.size)]

    def member(self, m: int) -> "MemberView":
        return MemberView(self, m)

    def close(self) -> None:
        """(Nothing runs beside the steps.)"""


class MemberView:
    """One member seen as a solo run's program, for what is kept per run: its checkpoints' position,
    its summary, an evaluation of its state alone."""

    def __init__(self, program: PackProgram, m: int):
        self.program, self.m = program, m
        self.loop, self.steps_per_epoch = program.loop, program.steps_per_epoch
        self.batch_size, self.input = program.member_batch_size, program.input

    def position(self, epoch: int) -> Dict[str, Any]:
        p = self.program
        return program_lib.resident_position(p.pack.configs[self.m].seed, epoch, p.augment_keys[self.m],
                                             p.member_order(self.m, epoch))

    def evaluate(self, state) -> Dict[str, float]:
        return self.program.base.evaluate(state)


def footprint(compiled) -> int:
    """Bytes a compiled call holds on its device at once: arguments, outputs that do not reuse an
    argument's buffer, and temporaries (XLA's memory analysis)."""
    m = compiled.memory_analysis()
    return int(m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes)


def device_memory_limit(mesh, given_gb) -> float:
    """Bytes a device may hold: ``given_gb``, or what the device reports (None where it reports none)."""
    if given_gb is not None:
        return given_gb * 2**30
    stats = (mesh.devices.flat[0] if mesh is not None else jax.devices()[0]).memory_stats() or {}
    return stats.get("bytes_limit")


def largest_fitting(need_k: int, need_1: int, k: int, limit: float) -> int:
    """The largest pack size that fits ``limit``, with memory linear in K through the two measures."""
    per_member = (need_k - need_1) / (k - 1) if k > 1 else need_1
    fixed = need_1 - per_member
    return max(0, int((limit - fixed) // per_member)) if per_member > 0 else k
