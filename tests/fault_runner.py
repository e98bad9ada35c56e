"""``python tests/fault_runner.py [imagenet] <flags>``: the trainer CLI with the CIFAR recipe (or
the ImageNet recipe when the first argument says so), with a fault the test asks for.

Faults are hooks the tests install, not code in the trainer. Each acts at an exact step, given by
an environment variable (so a test picks the moment, and a multi-host test one process):

* ``BN_JAX_TEST_KILL_AT_STEP=k``: SIGKILL right after step k has been dispatched;
* ``BN_JAX_TEST_SIGTERM_AT_STEP=k``: SIGTERM after step k (the real handler then checkpoints),
  or the signal ``BN_JAX_TEST_SIGNAL`` names (SIGUSR1, what SLURM's ``--signal=B:USR1`` sends);
* ``BN_JAX_TEST_GROUP_SIGTERM_AT_STEP=k``: SIGTERM to the whole process group after step k (grain's
  workers get it too, as under SLURM);
* ``BN_JAX_TEST_KILL_DURING_SAVE=k``: SIGKILL right after the checkpoint of step k has been
  handed to Orbax, while an asynchronous save is still being written.
"""

import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bn_jax import checkpoints, cli, hooks  # noqa: E402
from experiments import cifar, imagenet  # noqa: E402


class SignalAtStep(hooks.Hook):
    """Send this process (``group``: its whole process group, as SLURM, ``timeout`` and Ctrl-C do)
    ``signum`` once step ``step`` is done (before the trainer's hooks see it)."""

    def __init__(self, step: int, signum: int, group: bool = False):
        self.step, self.signum, self.group = step, signum, group

    def next_stop(self, step):
        import jax
        if jax.process_count() > 1:  # every process must make the same calls
            return None
        return self.step if step < self.step else None

    def after_steps(self, tick):
        if tick.first_step < self.step <= tick.step:
            if self.group:  # (the test starts this process in a session of its own)
                os.killpg(os.getpgrp(), self.signum)
            else:
                os.kill(os.getpid(), self.signum)


def kill_after_saving(step: int) -> None:
    save = checkpoints.Checkpointer.save

    def save_then_die(self, state, totals, meta, items=None):
        save(self, state, totals, meta, items)
        if int(state.step) == step:
            os.kill(os.getpid(), signal.SIGKILL)

    checkpoints.Checkpointer.save = save_then_die


def faults():
    env = os.environ
    out = []
    if "BN_JAX_TEST_KILL_AT_STEP" in env:
        out.append(SignalAtStep(int(env["BN_JAX_TEST_KILL_AT_STEP"]), signal.SIGKILL))
    if "BN_JAX_TEST_SIGTERM_AT_STEP" in env:
        signum = signal.Signals[env.get("BN_JAX_TEST_SIGNAL", "SIGTERM")]
        out.append(SignalAtStep(int(env["BN_JAX_TEST_SIGTERM_AT_STEP"]), signum))
    if "BN_JAX_TEST_GROUP_SIGTERM_AT_STEP" in env:
        out.append(SignalAtStep(int(env["BN_JAX_TEST_GROUP_SIGTERM_AT_STEP"]), signal.SIGTERM, group=True))
    if "BN_JAX_TEST_KILL_DURING_SAVE" in env:
        kill_after_saving(int(env["BN_JAX_TEST_KILL_DURING_SAVE"]))
    return out


if __name__ == "__main__":
    if sys.argv[1:2] == ["imagenet"]:
        sys.exit(cli.run_main(imagenet.RECIPE, sys.argv[2:], extra_hooks=faults()))
    sys.exit(cli.run_main(cifar.RECIPE, sys.argv[1:], extra_hooks=faults()))
