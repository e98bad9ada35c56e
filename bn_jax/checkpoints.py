"""Preemption-safe Orbax checkpoints: periodic saves, exact resume, fallback past corrupt steps.

A checkpoint at step ``s`` lives in ``<workdir>/checkpoints/<s>/`` and has two Orbax items:

* ``state`` (arrays): ``params`` (all leaves, or only the trainable ones in the small format),
  ``batch_stats``, ``opt_state``, ``step`` and ``epoch_totals`` (the summed train metrics of
  the partial epoch, so a mid-epoch resume writes the same epoch line);
* ``meta`` (JSON): step, epoch, position in the epoch, the config, the metrics history, the
  RNG state (seed, augmentation key data, a hash of the current epoch's data order), a
  fingerprint of the data and a hash of the frozen leaves.

Everything random in a run is a function of (seed, step), so (state, step) is all a resume needs.
See docs/checkpoints.md.
"""

import contextlib
import dataclasses
import os
import shutil
import time
from typing import Any, Callable, Dict, List, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

from bn_jax import config as config_lib
from bn_jax import orbax_failures, parallel, provenance, steps, train_modes
from bn_jax.hashing import hash_arrays
from bn_jax import workdir as workdir_lib
from bn_jax.config import CheckpointOptions  # noqa: F401  (declared with the other run options)

FORMAT_VERSION = 2  # 2: epoch order drawn by jax.random on the device
ITEMS = ("state", "meta", "data")  # data: a streamed input's iterator state (one file per host)
VERSION_KEYS = ("jax", "flax", "optax", "orbax-checkpoint")  # what shapes the saved train state


class CheckpointError(ValueError):
    """A checkpoint cannot be used (incompatible config, corrupt, frozen-weight hash mismatch)."""


class DiskFull(CheckpointError):
    """A write ran out of space; the message names the path and the bytes it needed."""


# ---- the manager ----------------------------------------------------------------------------

def _state_tree(state, totals, fmt: str):
    params = state.plan.trainable_leaves(state.params) if fmt == "small" else state.params
    return {"params": params, "batch_stats": state.batch_stats, "opt_state": state.opt_state,
            "step": jax.numpy.asarray(state.step, jax.numpy.int32), "epoch_totals": totals}


def state_hash(tree) -> str:
    """SHA-256 of a host state tree: detects corrupt bytes that Orbax would restore silently."""
    return hash_arrays((train_modes.path_name(p), x) for p, x in jax.tree_util.tree_leaves_with_path(tree))


def _all_finite(tree) -> bool:
    return all(np.all(np.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)
               if np.issubdtype(np.asarray(x).dtype, np.inexact))


def open_manager(path: str, options: CheckpointOptions):
    """Orbax's manager of the run's checkpoints, keeping the newest ``options.keep``."""
    policy = getattr(getattr(ocp, "checkpoint_managers", None), "LatestN", None)
    keep = {"preservation_policy": policy(n=options.keep)} if policy else {"max_to_keep": options.keep}
    manager_options = ocp.CheckpointManagerOptions(create=True, cleanup_tmp_directories=True,
                                                   enable_async_checkpointing=options.async_save, **keep)
    return ocp.CheckpointManager(path, item_names=ITEMS, options=manager_options)


class Checkpointer:
    """Saves and restores run checkpoints under ``<workdir>/checkpoints``; use as a context."""

    def __init__(self, workdir: str, options: CheckpointOptions, log=print):
        self.options = options.validate()
        self.run = workdir_lib.RunDir(workdir)
        self.path = self.run.checkpoints
        self.log = log
        self.manager = open_manager(self.path, self.options)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        try:
            with self._disk_full_as_error():
                self.manager.wait_until_finished()
        finally:  # also after a failed save: stop Orbax's threads before the process exits
            self.manager.close()

    @contextlib.contextmanager
    def _disk_full_as_error(self):
        """A save that ran out of space (now, or in the background before) becomes one DiskFull."""
        try:
            yield
        except Exception as e:  # noqa: BLE001  (Orbax wraps tensorstore's error in ValueError)
            needed = orbax_failures.disk_full_bytes(e)
            if needed is None:
                raise
            orbax_failures.FAILED_IN_BACKGROUND = True
            raise DiskFull(f"no space left on the device holding {self.path}: a checkpoint needed at least "
                           f"{needed:,} more bytes; the newest complete checkpoint, step {self.latest_saved()}, "
                           "is intact: free space and re-run the same command to resume") from None

    def steps(self) -> List[int]:
        return sorted(self.manager.all_steps())

    def save(self, state, totals, meta: Dict[str, Any], items: Optional[Dict[str, Any]] = None) -> None:
        """Write a checkpoint at ``state.step``; refuses (FloatingPointError) a non-finite state.
        ``items``: further Orbax items saved with it (a streamed input's iterator)."""
        host_state = jax.device_get(_state_tree(state, totals, self.options.format))
        step = int(host_state["step"])
        if not _all_finite(host_state):
            raise FloatingPointError(f"non-finite values in the train state at step {step}; not saving it")
        meta = dict(meta, format_version=FORMAT_VERSION, checkpoint_format=self.options.format, step=step,
                    state_sha256=state_hash(host_state), versions=provenance.versions())
        if step in self.manager.all_steps():  # e.g. re-saving the final step of a finished run
            return
        with self._disk_full_as_error():
            self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(host_state),
                                                            meta=ocp.args.JsonSave(meta), **(items or {})),
                              force=True)

    def restore_item(self, step: int, name: str, args):
        """One further item of checkpoint ``step`` (see ``save``)."""
        return self.manager.restore(step, args=ocp.args.Composite(**{name: args}))[name]

    def latest_saved(self) -> Optional[int]:
        steps = self.manager.all_steps()
        return max(steps) if steps else None

    def wait(self):
        with self._disk_full_as_error():
            self.manager.wait_until_finished()

    def restore_latest(self, fresh_state, fresh_totals, expected: "RunMeta", at_most: Optional[int] = None):
        """(state, totals, meta) from the newest restorable checkpoint (of a step <= ``at_most``, if
        given: a pack resumes its members at one step), or None if there is none.

        ``fresh_state`` is the state a new run of the current config starts from (its frozen
        leaves fill in small checkpoints); ``expected`` is this run's ``RunMeta``, which each
        checkpoint is checked against. Corrupt checkpoints are moved aside with a warning; an
        incompatible one raises CheckpointError.
        """
        steps = [s for s in self.steps() if at_most is None or s <= at_most]
        tried = []
        for step in reversed(steps):
            try:
                meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
                expected.check(meta, step, extend=self.options.extend)
                state, totals = self._restore_state(step, meta, fresh_state, fresh_totals)
            except CheckpointError:
                raise  # readable but not for this run: refuse, never fall back past it
            except Exception as e:  # noqa: BLE001  (Orbax/tensorstore raise many types for bad bytes)
                refuse_if_denied(self.path, step, e)  # (an access problem is not corruption: move nothing)
                self._quarantine(step, e)
                tried.append(step)
                continue
            return state, totals, meta
        if tried:
            raise CheckpointError(f"no restorable checkpoint left in {self.path} (corrupt steps "
                                  f"{', '.join(map(str, tried))} moved to {self.run.corrupt_checkpoints}); "
                                  "pass --restart to start over")
        return None

    def _restore_state(self, step, meta, fresh_state, fresh_totals):
        try:
            return _read_state(self.manager, step, meta, fresh_state, fresh_totals)
        except StateHashMismatch:
            raise
        except Exception as e:  # noqa: BLE001
            refuse_if_denied(self.path, step, e)
            refuse_if_readable(self.manager, self.path, step, meta, e)
            raise

    def _quarantine(self, step: int, error: Exception) -> None:
        dest = os.path.join(self.run.corrupt_checkpoints, f"{step}-{time.strftime('%Y%m%d-%H%M%S')}")
        self.log(f"warning: checkpoint step {step} in {self.path} is unreadable "
                 f"({type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}); "
                 f"moving it to {dest} and trying the previous one")
        if parallel.is_writer():  # one process moves it; the others wait for the move
            os.makedirs(self.run.corrupt_checkpoints, exist_ok=True)
            shutil.move(os.path.join(self.path, str(step)), dest)
        parallel.barrier(f"quarantine_{step}")
        self.manager.reload()


def refuse_if_denied(path: str, step: int, error: Exception) -> None:
    """CheckpointError, moving nothing, when checkpoint ``step`` in ``path`` failed to read for want
    of permission (a file this user may not read, or an error that says so), not for bad bytes."""
    folder = os.path.join(path, str(step))
    denied = unreadable_path(folder) or (folder if permission_denied(error) else None)
    if denied:
        raise CheckpointError(f"checkpoint step {step} cannot be read: permission denied on {denied} (not "
                              f"corrupt: nothing was moved); give this user read access, e.g. chmod -R u+rX "
                              f"{folder}, and re-run the same command") from None


def unreadable_path(folder: str) -> Optional[str]:
    """The first folder or file under ``folder`` this process may not read, or None."""
    for root, dirs, files in os.walk(folder):
        if not os.access(root, os.R_OK | os.X_OK):
            return root
        for name in dirs + files:
            path = os.path.join(root, name)
            if not os.access(path, os.R_OK | (os.X_OK if os.path.isdir(path) else 0)):
                return path
    return None


def permission_denied(error: BaseException) -> bool:
    """Whether ``error`` or what caused it is a permission error (tensorstore says PERMISSION_DENIED)."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, PermissionError) or "PERMISSION_DENIED" in str(error) or "Permission denied" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


def refuse_if_readable(manager, path: str, step: int, meta: Dict[str, Any], error: Exception) -> None:
    """The arrays did not restore into today's train state. If they read fine without that
    structure, the checkpoint is sound and the code differs (an optax that shapes its state
    otherwise, say): refuse naming the versions, rather than quarantine a good checkpoint."""
    try:
        manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    except Exception:  # noqa: BLE001  (unreadable as well: corrupt, the caller quarantines it)
        return
    saved = meta.get("versions") or {}
    now = provenance.versions()
    differ = ", ".join(f"{k} {saved.get(k, '?')} → {now[k]}" for k in VERSION_KEYS if saved.get(k) != now[k])
    raise CheckpointError(
        f"checkpoint step {step} in {path} is readable but does not fit this code's train state "
        f"({type(error).__name__}: {(str(error).splitlines() or [''])[0][:200]}); versions: "
        f"{differ or 'the same as when it was written'}. Resume with the versions it was written "
        "with, or pass --restart")


class StateHashMismatch(ValueError):
    """A checkpoint's arrays read, but their bytes differ from the hash saved with them."""


def _read_state(manager, step: int, meta: Dict[str, Any], fresh_state, fresh_totals):
    """(state, partial-epoch totals) of checkpoint ``step``, read into the structure of
    ``fresh_state`` (a new state of the same config, whose frozen leaves fill in a small one)."""
    fmt = meta["checkpoint_format"]
    target = jax.device_get(_state_tree(fresh_state, fresh_totals, fmt))
    tree = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))["state"]
    if state_hash(tree) != meta["state_sha256"]:
        raise StateHashMismatch("array bytes do not match the hash saved with them")
    tree = jax.device_put(tree)
    params = fresh_state.plan.merge_trainable(fresh_state.params, tree["params"]) if fmt == "small" else tree["params"]
    state = fresh_state.replace(params=params, batch_stats=tree["batch_stats"], opt_state=tree["opt_state"],
                                step=tree["step"])
    return state, tree["epoch_totals"]


def _check_format(meta: Dict[str, Any], where: str) -> None:
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{where} has format version {meta.get('format_version')}, "
                              f"this code reads {FORMAT_VERSION}; pass --restart or use another --workdir")


@dataclasses.dataclass(frozen=True)
class RunMeta:
    """What a checkpoint's metadata must match for this run to resume from it: the experiment, the
    data fingerprint, the frozen leaves' hash and, given ``position`` (the program's: epoch → seed,
    keys and the epoch order's hash), the data order and augmentation. Built once per run
    (``train.set_up``), saved in every checkpoint (``saved``) and checked in one place (``check``).
    Versions are recorded beside it and named when a sound checkpoint no longer fits; a streamed
    input's state is restored, or restarted, by the program's input."""

    experiment: Dict[str, Any]
    data_fingerprint: str
    frozen_hash: str
    position: Optional[Callable[[int], Dict[str, Any]]] = None

    def saved(self) -> Dict[str, Any]:
        return {"config": self.experiment, "data_fingerprint": self.data_fingerprint, "frozen_hash": self.frozen_hash}

    def check(self, meta: Dict[str, Any], step: int, extend: bool = False) -> None:
        """Raise CheckpointError naming what differs between checkpoint ``step`` and this run.

        ``extend``: the run may have been saved with fewer epochs than it now trains to (the step
        schedule's boundaries then move with the new total)."""
        where = f"checkpoint step {step}"
        _check_format(meta, where)
        self._check_experiment(meta, where, extend)
        if meta["data_fingerprint"] != self.data_fingerprint:
            raise CheckpointError(f"cannot resume from {where}: the training/test data differ from the data "
                                  "it was trained on (same flags, different files?); pass --restart to start over")
        if meta["checkpoint_format"] == "small" and meta["frozen_hash"] != self.frozen_hash:
            raise CheckpointError(f"cannot resume from small {where}: the frozen weights re-created from seed "
                                  f"{self.experiment['seed']} do not match its frozen-leaf hash (init recipe or "
                                  "JAX random bits changed?); refusing to combine them")
        if self.position is not None and meta["rng"] != self.position(meta["epoch"]):
            raise CheckpointError(
                f"{where}: this JAX/NumPy version derives a different data order or "
                "augmentation key from the seed; an exact resume is impossible (pass --restart)")

    def _check_experiment(self, meta, where: str, extend: bool) -> None:
        saved_epochs, epochs = meta["config"]["epochs"], self.experiment["epochs"]
        if extend and saved_epochs > epochs:  # (equal: an extension under way, stopped; it resumes)
            raise CheckpointError(f"cannot extend to {epochs} epochs: the run in {where} already has {saved_epochs}")
        diff = [k for k in config_lib.different_keys(meta["config"], self.experiment) if not (extend and k == "epochs")]
        if diff:
            changes = ", ".join(f"{k}: {meta['config'].get(k)!r} -> {self.experiment.get(k)!r}" for k in diff)
            hint = ("; to train a run further, pass --extend_to_epochs N"
                    if diff == ["epochs"] and epochs > saved_epochs else "")
            raise CheckpointError(f"cannot resume from {where}: config differs in {', '.join(diff)} ({changes}); "
                                  f"re-run with the original flags, or pass --restart to discard the old run{hint}")


def restore(workdir: str, state, step=None):
    """Load a checkpoint's full train state into the structure of ``state`` (a fresh state of the
    same config); small checkpoints take their frozen leaves from ``state``."""
    path = workdir_lib.RunDir(workdir).checkpoints
    if not os.path.isdir(path):  # (a CheckpointManager would create the folder: reading writes nothing)
        raise CheckpointError(f"{workdir} has no checkpoints/ folder")
    orbax_failures.quiet_read_only_notices()
    read_only = ocp.CheckpointManagerOptions(create=False, read_only=True)
    with ocp.CheckpointManager(path, item_names=ITEMS, options=read_only) as manager:
        step = manager.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"{path} holds no checkpoint")
        meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        _check_format(meta, f"checkpoint step {step} in {path}")
        if state.plan.mode != meta["config"]["train_mode"]:
            raise CheckpointError(f"checkpoint step {step} trained mode {meta['config']['train_mode']}; the given "
                                  f"state's plan trains {state.plan.mode}")
        if meta["checkpoint_format"] == "small" and state.plan.frozen_hash != meta["frozen_hash"]:
            raise CheckpointError(f"checkpoint step {step}: frozen weights of the given state do not match the saved hash")
        try:
            return _read_state(manager, step, meta, state, steps.zero_totals())[0]
        except StateHashMismatch as e:
            raise CheckpointError(f"checkpoint step {step} in {path}: {e}") from None
