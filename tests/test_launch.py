"""launch/: slurm.sbatch and torchrun.sh rendered with fake SLURM variables and fake srun / torchrun /
scontrol on PATH that record their arguments; the preemption path (SIGUSR1 -> ranks -> requeue);
sweep.yaml's command parses with train.py's CLI."""

import os
import shlex
import signal
import subprocess
import sys
import time

import pytest
import yaml

from conftest import ROOT

FAKES = {
    # srun: record, drop its own options, run the command; pass SIGUSR1 on to it (as srun does)
    "srun": """echo "srun $*" >> "$FAKE_LOG"
while [[ "$1" == --* ]]; do shift; done
trap 'echo "srun: USR1" >> "$FAKE_LOG"; kill -USR1 $child; wait $child; exit $?' USR1
"$@" & child=$!
wait $child""",
    # torchrun: record; with FAKE_HOLD, wait for SIGUSR1 like a training run that saves (FAKE_SAVES) and exits 0
    "torchrun": """echo "torchrun $*" >> "$FAKE_LOG"
if [[ -n "${FAKE_HOLD:-}" ]]; then
    on_usr1() {
        echo "torchrun: USR1" >> "$FAKE_LOG"
        [[ -n "${FAKE_SAVES:-}" ]] && mkdir -p "$OUT/checkpoints/step_7"
        exit 0
    }
    trap on_usr1 USR1
    prev=; for arg in "$@"; do [[ "$prev" == --output-dir ]] && OUT=$arg; prev=$arg; done  # the last one wins
    echo "torchrun: started" >> "$FAKE_LOG"
    for i in $(seq 300); do sleep 0.1; done
    exit 1
fi
exit ${FAKE_EXIT:-0}""",
    "scontrol": """echo "scontrol $*" >> "$FAKE_LOG"
[[ "$1 $2" == "show hostnames" ]] && printf 'gpu-node-07\\ngpu-node-08\\n'
exit 0""",
}


@pytest.fixture
def fake_cluster(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in FAKES.items():
        (bin_dir / name).write_text("#!/usr/bin/env bash\n" + body + "\n")
        (bin_dir / name).chmod(0o755)
    log = tmp_path / "calls.log"
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_LOG": str(log), "PYTHON": sys.executable,
           "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "sft", "SLURM_JOB_NODELIST": "gpu-node-[07-08]",
           "SLURM_NNODES": "2", "SLURM_GPUS_ON_NODE": "4", "SLURM_CPUS_PER_TASK": "32", "SLURM_SUBMIT_DIR": str(ROOT)}
    for key in ("RUN_DIR", "MASTER_PORT", "GPUS_PER_NODE", "OMP_NUM_THREADS", "NPROC"):
        env.pop(key, None)
    env["TORCHRUN"] = str(bin_dir / "torchrun")  # in place of launch/torchrun.py (the real torchrun)
    return env, log


def calls(log, program: str) -> list[list[str]]:
    return [shlex.split(line)[1:] for line in log.read_text().splitlines() if line.startswith(program + " ")]


def test_slurm_sbatch_runs_torchrun_per_node_with_c10d_rendezvous(fake_cluster):
    env, log = fake_cluster
    proc = subprocess.run(["bash", "launch/slurm.sbatch", "--model", "tiny-llama", "--max-steps", "2"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    [srun] = calls(log, "srun")
    assert "--ntasks-per-node=1" in srun and "--kill-on-bad-exit=1" in srun
    [torchrun] = calls(log, "torchrun")
    assert torchrun == ["--nnodes", "2", "--nproc_per_node", "4", "--rdzv_id", "4242", "--rdzv_backend", "c10d",
                        "--rdzv_endpoint", "gpu-node-07:29500", "./train.py", "--resume", "auto",
                        "--output-dir", "runs/sft-4242", "--model", "tiny-llama", "--max-steps", "2"]
    out = proc.stdout
    assert "job 4242 (restart 0): 2 node(s) x 4 GPUs [gpu-node-[07-08]], rendezvous gpu-node-07:29500" in out
    assert "OMP_NUM_THREADS=8" in out and "NCCL_DEBUG=WARN" in out and "SLURM_JOB_NODELIST=gpu-node-[07-08]" in out
    assert "PET_SIGNALS_TO_HANDLE=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1" in out
    assert "== python 3." in out and "torch 2." in out  # versions logged
    header = (ROOT / "launch/slurm.sbatch").read_text()
    assert "#SBATCH --requeue" in header and "#SBATCH --signal=B:USR1@" in header


@pytest.mark.parametrize("saves, own_dir", [(True, False), (False, False), (True, True)])
def test_slurm_sbatch_time_limit_signal_checkpoints_and_requeues(fake_cluster, tmp_path, saves, own_dir):
    """The ranks stop on SIGUSR1; the job is requeued only when they saved a new checkpoint (a run that
    cannot save before the time limit would otherwise restart from the same point forever), looked for
    in RUN_DIR or in the user's own --output-dir."""
    env, log = fake_cluster
    run_dir = str(tmp_path / "my-run")
    env = {**env, "FAKE_HOLD": "1", "PYTHON": "true", **({"FAKE_SAVES": "1"} if saves else {}),
           **({} if own_dir else {"RUN_DIR": run_dir})}
    args = ["--lora", "--output-dir", run_dir] if own_dir else ["--lora"]
    proc = subprocess.Popen(["bash", "launch/slurm.sbatch", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 60
    while "torchrun: started" not in (log.read_text() if log.exists() else ""):
        assert time.monotonic() < deadline and proc.poll() is None, "the fake torchrun never started"
        time.sleep(0.1)
    proc.send_signal(signal.SIGUSR1)  # what `#SBATCH --signal=B:USR1@300` does before the time limit
    out, _ = proc.communicate(timeout=60)
    lines = log.read_text().splitlines()
    assert lines.index("srun: USR1") < lines.index("torchrun: USR1")
    assert calls(log, "torchrun")[0][-5 - len(args) + 1:] == ["--resume", "auto", "--output-dir", run_dir, *args]
    assert "SIGUSR1 (time limit near)" in out and "srun exited with status 0" in out
    if saves:
        assert proc.returncode == 0 and lines.index("torchrun: USR1") < lines.index("scontrol requeue 4242"), out
    else:
        assert proc.returncode == 1 and "scontrol requeue 4242" not in lines, out
        assert f"no new checkpoint in {run_dir} since the job started: not requeued" in out


def test_torchrun_sh_passes_arguments_through(fake_cluster):
    env, log = fake_cluster
    env = {**env, "NPROC": "3"}
    proc = subprocess.run(["bash", "launch/torchrun.sh", "--model", "tiny-qwen2", "--lr", "1e-4"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert calls(log, "torchrun") == [["--standalone", "--nproc_per_node", "3", "train.py",
                                       "--model", "tiny-qwen2", "--lr", "1e-4"]]


def test_torchrun_forwards_sigusr1_and_train_py_checkpoints(tmp_path, small_data):
    """The real torchrun (one CPU worker): SIGUSR1 to torchrun reaches train.py through
    PET_SIGNALS_TO_HANDLE, which saves a checkpoint after the step in flight and exits; the launcher
    exits 0 with one line."""
    out = tmp_path / "run"
    env = {**os.environ, "NPROC": "1", "OMP_NUM_THREADS": "1"}
    env.pop("TORCHRUN", None)
    proc = subprocess.Popen(["bash", "launch/torchrun.sh", "--dataset", str(small_data), "--max-steps", "100000",
                             "--micro-batch-size", "8", "--log-every", "1", "--eval-exact-match", "0",
                             "--skip-export", "--output-dir", str(out)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:  # torchrun.sh execs torchrun: proc.pid is torchrun's
        lines.append(line)
        if line.startswith("step 2/"):
            proc.send_signal(signal.SIGUSR1)
            break
    rest, _ = proc.communicate(timeout=120)
    text = "".join(lines) + rest
    assert "SIGUSR1 received: stopped after a complete step and saved" in text, text[-3000:]
    assert text.rstrip().endswith("torchrun: stopped by SIGUSR1; the run saved a checkpoint"), text[-3000:]
    assert proc.returncode == 0 and "death signal" not in text  # a stop that saved is no failure
    [checkpoint] = (out / "checkpoints").iterdir()
    assert (checkpoint / "trainer_state.json").is_file()


def _args_no_boolean_flags(params: dict) -> list[str]:
    """What W&B's ${args_no_boolean_flags} passes: --key=value, and a bare --key for a true boolean."""
    out = []
    for key, value in params.items():
        if value is True:
            out.append(f"--{key}")
        elif value is not False:
            out.append(f"--{key}={value}")
    return out


@pytest.mark.parametrize("pick", [0, -1])
def test_sweep_yaml_commands_parse(pick):
    import train
    from core import defaults

    sweep = yaml.safe_load((ROOT / "launch/sweep.yaml").read_text())
    assert sweep["command"][-1] == "${args_no_boolean_flags}" and sweep["program"] == "train.py"
    params = {}
    for key, spec in sweep["parameters"].items():
        if "value" in spec:
            params[key] = spec["value"]
        elif "values" in spec:
            params[key] = spec["values"][pick]
        else:
            params[key] = spec["min"] if pick == 0 else spec["max"]
    cfg = train.parse_config(_args_no_boolean_flags(params))
    defaults.resolve_flags(cfg, cuda=True)  # as on a GPU, where packing is on unless switched off
    assert cfg.tracking.wandb and cfg.optim.lr == params["lr"]
    assert cfg.packing.packing is not params["no-packing"] and cfg.train.max_steps == params["max-steps"]
    assert cfg.train.micro_batch_size == params["micro-batch-size"]
    assert sweep["metric"]["name"] == "eval/val_loss"  # a key core/tracking.py logs
    assert sweep["project"] and "wandb-project" not in sweep["parameters"]  # wandb ignores the flag in a sweep


def test_a_rank_killed_by_a_signal_ends_the_launcher_in_one_line():
    """launch/torchrun.py without an error file (a rank killed, no line recorded): the signal's name, exit 1."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    sys.path.insert(0, str(ROOT / "launch"))
    from torchrun import failure_line

    killed = ProcessFailure(local_rank=1, pid=4242, exitcode=-int(signal.SIGKILL), error_file="<N/A>")
    line, code = failure_line(ChildFailedError("train.py", {1: killed}))
    assert (line, code) == ("torchrun: train.py failed on rank 1 (SIGKILL)", 1)


def test_the_launcher_names_a_killed_rank_over_those_whose_peer_vanished(tmp_path):
    """The OOM killer's SIGKILL on rank 1 breaks the others' collectives: they exit 1 with nothing recorded
    and rank 0's exit is the earliest seen. A rank's own error (its line in the error file) outranks both."""
    import json

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    sys.path.insert(0, str(ROOT / "launch"))
    from torchrun import failure_line

    def gone(rank, code, error_file="<N/A>"):
        return ProcessFailure(local_rank=rank, pid=4242 + rank, exitcode=code, error_file=error_file)

    failures = {0: gone(0, 1), 1: gone(1, -int(signal.SIGKILL)), 2: gone(2, 1), 3: gone(3, -int(signal.SIGTERM))}
    failures[0].timestamp -= 5
    assert failure_line(ChildFailedError("train.py", failures)) == ("torchrun: train.py failed on rank 1 (SIGKILL)", 1)
    error_file = tmp_path / "error2.json"
    error_file.write_text(json.dumps({"message": {"message": "ValueError: a bug", "extraInfo": {"timestamp": "9"}}}))
    failures[2] = gone(2, 1, str(error_file))
    assert failure_line(ChildFailedError("train.py", failures)) == \
        ("torchrun: train.py failed on rank 2 (exit code 1): ValueError: a bug", 1)


def test_the_launcher_names_the_rank_with_an_error_over_one_it_stopped(tmp_path):
    """Bad input fails every rank at once; torchrun stops a slower rank with SIGTERM, and that rank's
    error file can be the earlier one: the line still gives an erring rank's message and exit code."""
    import json

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    sys.path.insert(0, str(ROOT / "launch"))
    from torchrun import failure_line

    failures = {}
    for rank, code in ((1, -int(signal.SIGTERM)), (0, 2)):
        error_file = tmp_path / f"error{rank}.json"
        error_file.write_text(json.dumps({"message": {"message": "error: the command line did not parse",
                                                      "extraInfo": {"timestamp": str(101 - rank)}}}))
        failures[rank] = ProcessFailure(local_rank=rank, pid=4242 + rank, exitcode=code, error_file=str(error_file))
    line, code = failure_line(ChildFailedError("train.py", failures))
    assert (line, code) == ("torchrun: train.py failed on rank 0 (exit code 2): error: the command line did not "
                            "parse", 2)
