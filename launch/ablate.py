"""Ablations: a grid of flag variants x seeds -> one train.py run each, then a comparison table and plots.

    # 2 learning rates x 2 seeds of the embedded demo, one after another, then the table + plots
    python launch/ablate.py lr --vary "--lr 1e-3 | --lr 3e-3" --seeds 0 1 -- --max-steps 300

    # packing on/off x attention backends (4 configs), 3 seeds, 4 runs at a time on 4 GPUs
    python launch/ablate.py pack --vary "--no-packing | --packing" --vary "--attn sdpa | --attn flash" \
        --seeds 0 1 2 --gpus 0,1,2,3 -- --model llama3.2-1b --dataset my.jsonl

    # the same grid as a SLURM job array (rendered from launch/slurm.sbatch), one node per run
    python launch/ablate.py pack --vary "--no-packing | --packing" --seeds 0 1 --slurm --submit -- --model ...

Each `--vary` is one axis: its alternatives are separated by `|` (an empty one is the baseline);
the configs are every combination of one alternative per axis. Flags after `--` go to every run.
Each run gets its own directory `<out>/<name>/<config>/seed<N>/`, tagged with `ablation.json`
(ablation name, config, seed, command, exit code), a `--run-name` of `<name>/<config>/seed<N>`,
and, with `--wandb`, the W&B group `<name>`. Runs that already finished (exit 0, last step logged) are
skipped when the same command is run again (`--force` deletes the run directories and starts over); an
unfinished or stopped one continues from its checkpoint (`--resume auto`); a run directory holding a run
of other flags is refused. At the end `launch/compare.py` writes `results.md`,
`loss.png` and `throughput.png` into `<out>/<name>/` (for a SLURM array, run it yourself once the
array is done).
"""

import argparse
import itertools
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "launch"), str(REPO)]

import compare  # noqa: E402  (launch/compare.py, next to this file)
from core import count  # noqa: E402


def parse_args(argv=None):
    argv = full = sys.argv[1:] if argv is None else list(argv)
    common = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("name", help="ablation name: the run directory's parent and the W&B group")
    p.add_argument("--vary", action="append", default=[], metavar="'FLAGS | FLAGS'",
                   help="one axis of the grid: alternatives separated by '|' (repeat for more axes; "
                        "write --vary='--flag' when the value has no space, or argparse takes it for an option)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds (each config runs once per seed)")
    p.add_argument("--out", default="runs/ablations", help="parent of the ablation directory")
    p.add_argument("--gpus", default=None, help="comma-separated GPU ids: one run at a time on each")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time without --gpus (CPU)")
    p.add_argument("--force", action="store_true", help="delete the ablation's run directories and run them again")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    p.add_argument("--slurm", action="store_true", help="render <out>/<name>/array.sbatch instead of running")
    p.add_argument("--submit", action="store_true", help="with --slurm: sbatch the array")
    p.add_argument("--nodes", type=int, help="with --slurm: nodes per run (default 1)")
    p.add_argument("--gpus-per-node", type=int, help="with --slurm: GPUs per node (default 8)")
    p.add_argument("--parallel", type=int, help="with --slurm: most array tasks at once (default: no cap)")
    args = p.parse_args(argv)
    args.common, args.argv = common, full
    slurm_only = [f"--{k.replace('_', '-')}" for k in ("submit", "nodes", "gpus_per_node", "parallel")
                  if getattr(args, k) not in (None, False)]
    if slurm_only and not args.slurm:
        verb = "go" if len(slurm_only) > 1 else "goes"
        p.error(f"{', '.join(slurm_only)} {verb} with --slurm (a job array); add --slurm, or drop them to run here")
    args.nodes, args.gpus_per_node, args.parallel = args.nodes or 1, args.gpus_per_node or 8, args.parallel or 0
    if own := [f for f in common if f.split("=")[0] in OWN]:
        p.error(f"{own[0]} is ablate.py's own option: put it before `--` (what follows `--` goes to train.py)")
    seen = {}
    for axis in args.vary:
        try:
            flags = {f.split("=")[0] for alt in axis.split("|") for f in shlex.split(alt) if f.startswith("--")}
        except ValueError as e:
            p.error(f"--vary {axis!r}: {e}; close each quote within its alternative")
        if twice := sorted(flags & seen.keys()):
            p.error(f"{twice[0]} varies on two --vary axes ({seen[twice[0]]!r} and {axis!r}); put all its values "
                    f"on one axis")
        seen.update(dict.fromkeys(flags, axis))
    if not re.fullmatch(r"[\w.-]+", args.name):
        p.error(f"name {args.name!r}: use letters, digits, '.', '-', '_' (it names a directory)")
    if not args.vary:
        p.error("give at least one --vary axis, e.g. --vary '--lr 1e-3 | --lr 3e-3'")
    for flag, why in SET_HERE.items():
        if any(f == flag or f.startswith(flag + "=") for f in [*common, *" ".join(args.vary).split()]):
            p.error(f"{flag}: ablate.py sets it for every run ({why}); leave it out")
    return args


OWN = ("--vary", "--seeds", "--out", "--gpus", "--jobs", "--force", "--dry-run", "--slurm", "--submit", "--nodes",
       "--gpus-per-node", "--parallel")
SET_HERE = {"--seed": "from --seeds", "--output-dir": "<out>/<name>/<config>/seed<N>",
            "--run-name": "<name>/<config>/seed<N>", "--wandb-group": "the ablation's name"}


def label(flags: list[str]) -> str:
    """A directory-safe name for a flag list: ['--lr', '1e-3', '--packing'] -> 'lr=1e-3,packing'."""
    parts, i = [], 0
    while i < len(flags):
        name = flags[i].lstrip("-")
        if i + 1 < len(flags) and not flags[i + 1].startswith("--"):
            name, i = f"{name}={flags[i + 1]}", i + 1
        parts.append(name)
        i += 1
    return re.sub(r"[^\w.=,+-]", "_", ",".join(parts)) or "base"


def grid(axes: list[str]) -> list[tuple[str, list[str]]]:
    """Every combination of one alternative per axis -> [(label, flags)]."""
    choices = [[shlex.split(alt) for alt in axis.split("|")] for axis in axes]
    configs = []
    for combo in itertools.product(*choices):
        flags = [f for alt in combo for f in alt]
        configs.append((label(flags), flags))
    labels = [c[0] for c in configs]
    if len(set(labels)) != len(labels):
        raise SystemExit(f"error: the --vary axes give duplicate configs: {labels}")
    return configs


def plan(args) -> list[dict]:
    root = Path(args.out) / args.name
    uses_wandb = "--wandb" in args.common or any("--wandb" in axis.split() for axis in args.vary)
    runs = []
    for config, flags in grid(args.vary):
        for seed in args.seeds:
            run_dir = root / config / f"seed{seed}"
            train_args = [*args.common, *flags, "--seed", str(seed), "--output-dir", str(run_dir),
                          "--run-name", f"{args.name}/{config}/seed{seed}"]
            if uses_wandb:
                train_args += ["--wandb-group", args.name, "--wandb-tags", *_user_tags(args.common), args.name, config]
            runs.append({"ablation": args.name, "config": config, "seed": seed, "flags": flags,
                         "run_dir": str(run_dir), "train_args": train_args})
    return runs


def _user_tags(common: list[str]) -> list[str]:
    """The --wandb-tags given after `--`: kept, since the run's own (name, config) come after and tyro
    takes the last --wandb-tags."""
    if "--wandb-tags" not in common:
        return []
    rest = common[common.index("--wandb-tags") + 1:]
    return list(itertools.takewhile(lambda f: not f.startswith("--"), rest))


def write_manifest(args, runs: list[dict]) -> Path:
    root = Path(args.out) / args.name
    root.mkdir(parents=True, exist_ok=True)
    sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    manifest = {"name": args.name, "command": shlex.join(["python", "launch/ablate.py", *args.argv]),
                "vary": args.vary, "seeds": args.seeds, "common": args.common, "git_sha": sha or None,
                "runs": [{k: r[k] for k in ("config", "seed", "run_dir")} for r in runs]}
    (root / "ablation.json").write_text(json.dumps(manifest, indent=1))
    for r in runs:
        tag_run(r)
    return root


def tag_run(run: dict, **extra) -> None:
    """<run dir>/ablation.json: which ablation, config and seed this run is (compare.py groups by it)."""
    path = Path(run["run_dir"]) / "ablation.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    old = _tag(run)
    keep = {k: run[k] for k in ("ablation", "config", "seed", "flags", "train_args")}
    command = shlex.join(["python", "train.py", "--resume", "auto", *run["train_args"]])  # as run_local runs it
    path.write_text(json.dumps({**old, **keep, "command": command,
                                **extra}, indent=1))


def _tag(run: dict) -> dict:
    return compare.read_json(Path(run["run_dir"]) / "ablation.json")


def finished(run: dict) -> bool:
    """Trained to its last step and exited 0, or saved its final model before it was killed (a run
    stopped by a signal exits 0 after saving a checkpoint; it is not finished, --resume auto continues it)."""
    done = _tag(run).get("exit_code") == 0 or (Path(run["run_dir"]) / "final").is_dir()
    return done and compare.complete(Path(run["run_dir"]))


def _holds_results(run: dict) -> bool:
    """A checkpoint that --resume auto would continue from, or a final model (written whole or not at all)."""
    out = Path(run["run_dir"])
    return (out / "final").is_dir() or any((out / "checkpoints").glob("step_*/trainer_state.json"))


def ran_otherwise(runs: list[dict]) -> list[dict]:
    """Runs whose directory holds results of other flags (the shared flags after `--` changed, say): they
    would be kept, or continued, under the new command. Also when that run was stopped with ablate.py,
    which then recorded no exit code. A failed run of other flags with nothing saved just runs again."""
    def ran(tag: dict):
        return tag.get("train_args", shlex.split(tag.get("command", ""))[2:] or None)
    return [r for r in runs if ran(t := _tag(r)) not in (None, r["train_args"])
            and (t.get("exit_code") == 0 or _holds_results(r))]


def refused_flags(runs: list[dict]) -> str | None:
    """Each config's flags parsed as train.py parses them (tyro), before any run starts or array task is
    queued: a typo fails here once, not in every run. Values that need the machine are checked by the runs."""
    import tyro

    import train

    for run in {r["config"]: r for r in runs}.values():
        try:
            tyro.cli(train.Config, args=run["train_args"], config=train.CLI, prog="train.py")
        except SystemExit:  # tyro printed what it refused, above
            return (f"config {run['config']}: train.py refuses its flags (above); fix the --vary axis or the "
                    f"flags after --")
    return None


def _train_py() -> str:
    """train.py from the caller's directory: the runs' relative paths (--dataset, --out) keep their meaning."""
    return os.path.relpath(REPO / "train.py")


def run_local(runs: list[dict], slots: list[str]) -> int:
    """Run train.py for each run, len(slots) at a time; a slot 'gpu:<id>' pins it with CUDA_VISIBLE_DEVICES.
    Stopped itself (Ctrl-C, SIGTERM), it stops the runs it started, which save a checkpoint, records how
    each ended, and exits: the same command continues them."""
    train_py = _train_py()
    pending, active, failed = list(enumerate(runs, 1)), {}, 0
    signal.signal(signal.SIGTERM, _stopped)
    try:
        while pending or active:
            for slot in [s for s in slots if s not in active]:
                if not pending:
                    break
                i, run = pending.pop(0)
                active[slot] = (i, run, *_start(run, slot, len(slots), train_py), time.time())
            time.sleep(0.2)
            for slot, (i, run, proc, log, t0) in list(active.items()):
                if proc.poll() is not None:
                    del active[slot]
                    failed += _ended(i, len(runs), run, proc, log, t0, slot)
    except (KeyboardInterrupt, Stopped) as e:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the runs end on their own now: no second traceback
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print(f"\n{'SIGTERM' if isinstance(e, Stopped) else 'Ctrl-C'}: stopping {count(len(active), 'run')}; each "
              f"saves a checkpoint",
              flush=True)
        for i, run, proc, log, t0 in active.values():
            if isinstance(e, Stopped):  # Ctrl-C reached the runs from the terminal; a SIGTERM reached only us
                proc.send_signal(signal.SIGTERM)
        for slot, (i, run, proc, log, t0) in active.items():
            proc.wait()
            _ended(i, len(runs), run, proc, log, t0, slot)
        print("the same command continues them", flush=True)
        raise SystemExit(143 if isinstance(e, Stopped) else 130) from None
    return failed


class Stopped(Exception):
    """SIGTERM to ablate.py."""


def _stopped(signum, frame):
    raise Stopped


def _start(run: dict, slot: str, n_slots: int, train_py: str):
    env = dict(os.environ)
    if slot.startswith("gpu:"):
        env["CUDA_VISIBLE_DEVICES"] = slot[4:]
    elif n_slots > 1:  # CPU runs side by side: each its share of the cores, not all of them
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // n_slots)))
    log = open(Path(run["run_dir"]) / "train.log", "a")  # a resumed run keeps its first part's log
    cmd = [sys.executable, train_py, "--resume", "auto", *run["train_args"]]
    return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT), log


def _ended(i: int, n: int, run: dict, proc, log, t0: float, slot: str) -> bool:
    """Record and print how a run ended; True when it failed."""
    log.close()
    tag_run(run, exit_code=proc.returncode, seconds=round(time.time() - t0, 1))
    where = f" on GPU {slot[4:]}" if slot.startswith("gpu:") else ""
    if proc.returncode:
        status = f"FAILED (exit {proc.returncode}, see {log.name})"
    elif stopped := compare.stopped(compare.load_run(Path(run["run_dir"]))):
        status = f"stopped at {stopped} (the same command continues it)"
    else:
        status = "ok"
    print(f"[{i}/{n}] {run['config']} seed {run['seed']}{where}: {status} in {time.time() - t0:.0f} s", flush=True)
    return proc.returncode != 0


def _sbatch_option(text: str, key: str) -> int:
    """A number an #SBATCH line of launch/slurm.sbatch sets (its node: --gpus-per-node, --cpus-per-task)."""
    return int(re.search(rf"^#SBATCH --{key}=(\d+)$", text, flags=re.M).group(1))


def render_array(args, runs: list[dict]) -> str:
    """launch/slurm.sbatch as a job array: one task per run, its flags picked by SLURM_ARRAY_TASK_ID."""
    text = (REPO / "launch" / "slurm.sbatch").read_text()
    node_gpus, node_cpus = _sbatch_option(text, "gpus-per-node"), _sbatch_option(text, "cpus-per-task")
    array = f"0-{len(runs) - 1}" + (f"%{args.parallel}" if args.parallel else "")
    header = {"job-name": f"ablate-{args.name}", "nodes": str(args.nodes),
              "gpus-per-node": str(args.gpus_per_node), "output": "slurm-%x-%A_%a.out",
              "cpus-per-task": str(node_cpus * args.gpus_per_node // node_gpus)}
    for key, value in header.items():
        text, n = re.subn(rf"^#SBATCH --{key}=.*$", f"#SBATCH --{key}={value}", text, count=1, flags=re.M)
        assert n == 1, f"launch/slurm.sbatch lost its #SBATCH --{key} line"
    if args.gpus_per_node < node_gpus:  # part of a node: tasks share nodes, each on a rendezvous port of its own
        text = text.replace("#SBATCH --exclusive\n", "", 1)
    text = text.replace(f"#SBATCH --job-name=ablate-{args.name}\n",
                        f"#SBATCH --job-name=ablate-{args.name}\n#SBATCH --array={array}\n", 1)
    cases = [f"    {k}) RUN_DIR={shlex.quote(r['run_dir'])}\n"
             f"       TRAIN_ARGS=({shlex.join(r['train_args'])}) ;;" for k, r in enumerate(runs)]
    block = (f"# >>> run (ablation {args.name}: {len(runs)} runs, rendered by launch/ablate.py)\n"
             "export MASTER_PORT=${MASTER_PORT:-$((29500 + SLURM_ARRAY_TASK_ID % 1000))}\n"
             f"NANOTUNE_DIR={shlex.quote(str(REPO))}  # run dirs and data stay relative to the submit directory\n"
             'case "${SLURM_ARRAY_TASK_ID:?submit with sbatch (a job array)}" in\n' + "\n".join(cases) +
             '\n    *) echo "no run for array task $SLURM_ARRAY_TASK_ID" >&2; exit 1 ;;\nesac\n# <<< run')
    text, n = re.subn(r"^# >>> run$.*?^# <<< run$", lambda _: block, text, count=1, flags=re.M | re.S)
    assert n == 1, "launch/slurm.sbatch lost its '# >>> run' ... '# <<< run' block"
    return text


def main(argv=None) -> int:
    args = parse_args(argv)
    runs = plan(args)
    if args.dry_run:
        print("\n".join(shlex.join(["python", _train_py(), "--resume", "auto", *r["train_args"]]) for r in runs))
        return 0
    if bad := refused_flags(runs):
        print(f"error: {bad}", file=sys.stderr)
        return 2
    if args.force:  # a fresh start: --resume auto would otherwise continue from a run's last checkpoint
        for r in runs:
            shutil.rmtree(r["run_dir"], ignore_errors=True)
    if stale := ran_otherwise(runs):
        print(f"error: {stale[0]['run_dir']} (and {len(stale) - 1} more) ran with other flags than this command "
              f"gives it; --force reruns the ablation, deleting a run's directory reruns that run, or give the "
              f"ablation another name", file=sys.stderr)
        return 2
    root = write_manifest(args, runs)
    if args.slurm:
        script = root / "array.sbatch"
        script.write_text(render_array(args, runs))
        compare_py = os.path.relpath(REPO / "launch" / "compare.py")
        print(f"wrote {script} ({len(runs)} array tasks); submit it from here; after they finish: "
              f"python {compare_py} {root}")
        if args.submit:
            return subprocess.run(["sbatch", str(script)]).returncode
        return 0
    todo = [r for r in runs if not finished(r)]
    if len(todo) < len(runs):
        print(f"{len(runs) - len(todo)} of {len(runs)} runs already finished (--force reruns them)")
    slots = [f"gpu:{g}" for g in args.gpus.split(",")] if args.gpus else [f"cpu:{k}" for k in range(args.jobs)]
    failed = run_local(todo, slots)
    table = compare.main([str(root), "--out", str(root)])
    return 1 if failed or table else 0


if __name__ == "__main__":
    sys.exit(main())
