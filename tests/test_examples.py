"""The cluster recipes in examples/: each runs as documented (dry: srun and scontrol are stand-ins
that record their arguments), its trainer command parses, and the docs show it verbatim."""

import os
import shlex
import stat
import subprocess
import sys

import pytest
import yaml

from bn_jax import cli
from experiments import cifar

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")
RECIPES = ["slurm/train.sbatch", "slurm/sweep_array.sbatch", "kubernetes/indexed_job.yaml", "tpu/train_tpu_vm.sh"]


def text(name):
    with open(os.path.join(EXAMPLES, name)) as f:
        return f.read()


def trainer_flags(command: str):
    """The flags after ``python -m experiments.cifar`` in a shell command line."""
    words = shlex.split(command)
    at = words.index("experiments.cifar")
    return words[at + 1:]


def parses(flags) -> bool:
    """Every flag is one the trainer knows, with a value it accepts (argparse only: the paths are the cluster's)."""
    cli.build_parser(cifar.RECIPE).parse_args(flags)
    return True


def stubs(tmp_path, srun_code: int):
    """A folder of stand-ins: ``srun`` records its arguments and exits ``srun_code``; ``scontrol`` records."""
    folder = tmp_path / "bin"
    folder.mkdir()
    for name, code in (("srun", srun_code), ("scontrol", 0)):
        path = folder / name
        path.write_text(f'#!/bin/bash\nprintf "%s\\0" "$@" > "{tmp_path}/{name}.args"\nexit {code}\n')
        path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return folder


def run_script(tmp_path, name, srun_code, **env):
    path = os.pathsep.join([str(stubs(tmp_path, srun_code)), os.path.dirname(sys.executable), os.environ["PATH"]])
    return subprocess.run(["bash", os.path.join(EXAMPLES, name)], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PATH": path, "SLURM_SUBMIT_DIR": ROOT, **env})


def recorded(tmp_path, name):
    path = tmp_path / f"{name}.args"
    return path.read_text().split("\0")[:-1] if path.exists() else None


def sbatch_options(name):
    return {line.split()[1].split("=")[0]: line.split()[1].partition("=")[2]
            for line in text(name).splitlines() if line.startswith("#SBATCH")}


@pytest.mark.parametrize("code, requeued", [(75, True), (0, False), (1, False)])
def test_train_sbatch_requeues_exactly_when_the_run_stopped_to_resume(tmp_path, code, requeued):
    result = run_script(tmp_path, "slurm/train.sbatch", code, SLURM_JOB_ID="4242", WORKDIR=str(tmp_path / "run"))
    assert result.returncode == code, result.stderr
    assert recorded(tmp_path, "scontrol") == (["requeue", "4242"] if requeued else None)
    srun = recorded(tmp_path, "srun")
    assert srun[:3] == ["python", "-m", "experiments.cifar"] and parses(srun[3:])
    assert srun[srun.index("--workdir") + 1] == str(tmp_path / "run")  # the same workdir on every requeue


def test_train_sbatch_uses_one_task_per_gpu_and_a_signal_before_the_limit():
    options = sbatch_options("slurm/train.sbatch")
    assert options["--ntasks-per-node"] == options["--gpus-per-node"]
    assert "--gpus-per-task" not in options  # JAX expects each task to see all of the node's GPUs
    assert options["--signal"] == "TERM@120" and "--requeue" in options


def sweep_lines(root):
    out = subprocess.run([sys.executable, "-m", "experiments.sweep", "--preset", "depth", "--root", root,
                          "--epochs", "1", "--print_only"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    return out.stdout.splitlines()


def test_sweep_lines_read_in_part_end_quietly(tmp_path, monkeypatch):
    """`sweep --print_only | head -1`: the reader closes the pipe early; the sweep exits 0 without a traceback."""
    from experiments import sweep

    class ClosedPipe:
        def __init__(self):
            self.fd = os.open(str(tmp_path / "stdout"), os.O_WRONLY | os.O_CREAT)

        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self):
            pass

        def fileno(self):
            return self.fd
    monkeypatch.setattr(sys, "stdout", ClosedPipe())
    assert sweep.main(["--preset", "depth", "--root", str(tmp_path / "runs"), "--print_only"]) == 0


@pytest.mark.slow
def test_sweep_array_task_runs_its_line_of_the_sweep(tmp_path):
    sweep = f"--preset depth --root {tmp_path / 'runs'} --epochs 1"
    lines = sweep_lines(str(tmp_path / "runs"))
    result = run_script(tmp_path, "slurm/sweep_array.sbatch", 0, SWEEP=sweep, SLURM_ARRAY_TASK_ID="1")
    assert result.returncode == 0, result.stderr
    assert recorded(tmp_path, "srun") == ["bash", "-c", lines[1]] and parses(trainer_flags(lines[1]))
    again = tmp_path / "again"
    again.mkdir()
    beyond = run_script(again, "slurm/sweep_array.sbatch", 0, SWEEP=sweep, SLURM_ARRAY_TASK_ID=str(len(lines)))
    assert beyond.returncode == 0 and "no such run line" in beyond.stdout
    assert recorded(again, "srun") is None


def test_kubernetes_job_does_not_count_exit_75_as_a_failure():
    service, job = yaml.safe_load_all(text("kubernetes/indexed_job.yaml"))
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"]
    assert spec["template"]["spec"]["restartPolicy"] == "Never"  # (a podFailurePolicy requires it)
    rule, = spec["podFailurePolicy"]["rules"]
    container, = spec["template"]["spec"]["containers"]
    assert rule["action"] == "Ignore" and rule["onExitCodes"] == {"containerName": container["name"],
                                                                   "operator": "In", "values": [75]}
    flags = trainer_flags(container["args"][0].replace("$JOB_COMPLETION_INDEX", "1"))
    assert parses(flags)
    assert int(flags[flags.index("--num_processes") + 1]) == spec["completions"]
    host = flags[flags.index("--coordinator_address") + 1].split(":")[0]
    assert host == f"{job['metadata']['name']}-0.{spec['template']['spec']['subdomain']}"
    assert service["metadata"]["name"] == spec["template"]["spec"]["subdomain"]
    assert service["spec"]["clusterIP"] == "None"  # headless: each pod gets its own DNS name


def test_tpu_vm_command_parses():
    script = text("tpu/train_tpu_vm.sh")
    assert subprocess.run(["bash", "-n", os.path.join(EXAMPLES, "tpu/train_tpu_vm.sh")]).returncode == 0
    remote = shlex.split(script.split("--command", 1)[1].replace("\\\n", " "))[0]
    assert "--worker=all" in script and parses(trainer_flags(remote.split("&&")[-1]))


@pytest.mark.parametrize("name", RECIPES)
def test_docs_show_each_recipe_as_it_is(name):
    with open(os.path.join(ROOT, "docs", "clusters.md")) as f:
        assert text(name).strip() in f.read()
    with open(os.path.join(ROOT, "README.md")) as f:
        assert f"examples/{name}" in f.read()
