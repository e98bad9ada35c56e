"""Orbax checkpoints of the train state (params, batch_stats, optimizer state, step)."""

import os

import jax
import orbax.checkpoint as ocp


def state_tree(state):
    return {"params": state.params, "batch_stats": state.batch_stats,
            "opt_state": state.opt_state, "step": state.step}


def save_final(workdir: str, state) -> str:
    path = os.path.abspath(os.path.join(workdir, "checkpoints"))
    with ocp.CheckpointManager(path) as manager:
        manager.save(int(state.step), args=ocp.args.StandardSave(state_tree(state)), force=True)
        manager.wait_until_finished()
    return path


def restore(workdir: str, state, step=None):
    """Restore into the structure of ``state`` (a freshly created state of the same config)."""
    path = os.path.abspath(os.path.join(workdir, "checkpoints"))
    with ocp.CheckpointManager(path) as manager:
        step = manager.latest_step() if step is None else step
        tree = manager.restore(step, args=ocp.args.StandardRestore(state_tree(state)))
    return state.replace(params=tree["params"], batch_stats=tree["batch_stats"],
                         opt_state=tree["opt_state"], step=tree["step"])
