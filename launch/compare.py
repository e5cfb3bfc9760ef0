"""Compare runs: run directories (or a W&B group) -> a Markdown table and PNG plots of loss and throughput.

    python launch/compare.py runs/ablations/lr                    # every run dir below it
    python launch/compare.py runs/a runs/b --out reports/ab       # results.md, loss.png, throughput.png
    python launch/compare.py --wandb-group my-entity/nanotune/lr   # runs logged with --wandb-group lr

Runs are grouped into configs: by the `config` in their `ablation.json` (launch/ablate.py writes it;
by ablation and config when runs of several ablations are compared), else by the flags whose values
differ between runs (the seed, run dir and W&B names aside). Per config the table gives the mean ±
sample standard deviation over seeds of: the training loss of the last logging window, the final and
best validation loss, exact match, tokens/s (the mean over logging windows after step 1, which holds
compilation and warm-up) and peak memory (GiB; peak RSS on a CPU); "(n=1)" where fewer seeds have the
value. Under the table: runs left out (failed, or stopped before their last step) and configs whose runs
differ in more than the seed. Above it: the command, git SHA, device and versions, from the runs' own
`run.json`. The plots show each config's mean curve over seeds with its min-max band.
"""

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository: core/ and its log words
from core import count  # noqa: E402

IGNORED = ("train.seed", "train.output_dir", "train.resume", "tracking.", "auto")  # do not define a config
COLUMNS = [("final_loss", "train loss (last window)", "{:.4f}"), ("val_loss", "val loss (final)", "{:.4f}"),
           ("best_val_loss", "val loss (best)", "{:.4f}"), ("exact_match", "exact match", "{:.1%}"),
           ("tokens_per_s", "tokens/s", "{:,.0f}"), ("peak_mem_gib", "peak mem (GiB)", "{:.2f}")]


def read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def load_run(run_dir: Path) -> dict:
    return {"dir": str(run_dir), "metrics": _metrics(run_dir), "config": read_json(run_dir / "config.json"),
            "info": read_json(run_dir / "run.json"), "ablation": read_json(run_dir / "ablation.json")}


def complete(run_dir: Path) -> bool:
    """The run logged its last step (run.json's total_steps): not stopped by a signal partway."""
    run = load_run(run_dir)
    return bool(run["metrics"]) and run["info"].get("total_steps") is not None and stopped(run) is None


def stopped(run: dict) -> str | None:
    """'step N of M' for a run that ended before its last step, else None."""
    total, steps = run["info"].get("total_steps"), [m["step"] for m in run["metrics"]]
    if total is None or not steps or steps[-1] >= total:
        return None
    return f"step {steps[-1]} of {total}"


def find_runs(paths: list[str]) -> list[dict]:
    """The runs under each path: the path itself, the runs its ablation.json lists (the grid launch/ablate.py
    ran last, not runs of an earlier grid left beside them), or every run directory below it."""
    dirs = []
    for p in map(Path, paths):
        listed = read_json(p / "ablation.json").get("runs")
        if (p / "metrics.jsonl").is_file():
            dirs.append(p)
        elif listed:  # a run that failed before its first step has no metrics: listed as failed
            grid = [p / r["config"] / f"seed{r['seed']}" for r in listed]
            dirs += [d for d in grid if (d / "metrics.jsonl").is_file() or (d / "ablation.json").is_file()]
        else:  # run.json is written before the first step: a run that failed before it is listed as failed
            dirs += sorted({m.parent for name in ("metrics.jsonl", "run.json") for m in p.rglob(name)})
    return [load_run(d) for d in dirs]


def failed(runs: list[dict]) -> list[dict]:
    """Runs whose ablation.json records a non-zero exit, or that logged nothing: left out of the table,
    listed under it."""
    return [r for r in runs if r["ablation"].get("exit_code") not in (None, 0) or not r["metrics"]]


def left_out(runs: list[dict]) -> tuple[list[dict], str]:
    """The runs the table compares, and the lines under it on the others: failed, or stopped partway
    (a final loss of step 40 is not one of step 400)."""
    notes, bad = [], failed(runs)
    for r in bad:
        code = r["ablation"].get("exit_code")
        why = f"exit {code}" if code not in (None, 0) else "no step logged"
        notes.append(f"- failed: {r['label']} seed {r['seed']} ({why}), see {Path(r['dir']) / 'train.log'}")
    for r in runs:
        if r not in bad and (where := stopped(r)):
            bad.append(r)
            notes.append(f"- stopped at {where}: {r['label']} seed {r['seed']} (rerun to resume it), {r['dir']}")
    kept = [r for r in runs if r not in bad]
    for label, members in group(kept).items():
        if len({json.dumps(_setting(r)) for r in members}) > 1:
            notes.append(f"- {label}: its runs differ in more than the seed ({', '.join(_differing(members))}); "
                         f"its mean mixes them")
    return kept, "".join(f"{n}\n" for n in notes)


def _setting(run: dict) -> dict:
    return {k: v for k, v in _flat(run["config"]).items() if not k.startswith(IGNORED)}


def _differing(runs: list[dict]) -> list[str]:
    flats = [_setting(r) for r in runs]
    return [k for k in sorted({k for f in flats for k in f}) if len({json.dumps(f.get(k)) for f in flats}) > 1]


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def label_runs(runs: list[dict]) -> None:
    """Set run['label']: the ablation config, else the differing flags, as 'lr=0.003,packing=True'."""
    differ = _differing(runs)
    several = len({r["ablation"].get("ablation") for r in runs}) > 1  # runs of several ablations: named by both
    for run in runs:
        flat = _setting(run)
        auto = ",".join(f"{k.split('.')[-1]}={flat.get(k)}" for k in differ) or "all runs"
        config = run["ablation"].get("config")
        run["label"] = (f"{run['ablation'].get('ablation')}/{config}" if several else config) if config else auto
        run["seed"] = run["ablation"].get("seed", run["config"].get("train", {}).get("seed"))


def summarize(metrics: list[dict]) -> dict:
    train = [m for m in metrics if m.get("loss") is not None]
    val = [m["val_loss"] for m in metrics if m.get("val_loss") is not None and m["step"] > 0]  # trained models only
    windows = [m["tokens_per_s"] for m in train if m["step"] > 1] or [m["tokens_per_s"] for m in train]
    mem = [m["peak_mem_gib"] for m in train if m.get("peak_mem_gib") is not None]
    em = [m["exact_match"] for m in metrics if m.get("exact_match") is not None]
    return {"final_loss": train[-1]["loss"] if train else None, "val_loss": val[-1] if val else None,
            "best_val_loss": min(val) if val else None, "exact_match": em[-1] if em else None,
            "tokens_per_s": statistics.fmean(windows) if windows else None, "peak_mem_gib": max(mem, default=None)}


def group(runs: list[dict]) -> dict[str, list[dict]]:
    groups = {}
    for run in runs:
        groups.setdefault(run["label"], []).append(run)
    return groups


def _cell(values: list, fmt: str) -> str:
    """mean ± sample standard deviation over the seeds that have the value; (n=k) when not all do."""
    have = [v for v in values if v is not None]
    if not have:
        return "–"
    n = f" (n={len(have)})" if len(have) < len(values) else ""
    if len(have) == 1:
        return fmt.format(have[0]) + n
    return f"{fmt.format(statistics.fmean(have))} ± {fmt.format(statistics.stdev(have))}{n}"


def table(runs: list[dict]) -> str:
    head = "| config | seeds | " + " | ".join(c[1] for c in COLUMNS) + " |"
    rows = [head, "|" + "---|" * (len(COLUMNS) + 2)]
    for name, members in group(runs).items():
        stats = [summarize(r["metrics"]) for r in members]
        seeds = ", ".join(str(r["seed"]) for r in members)
        rows.append(f"| {name} | {seeds} | " + " | ".join(_cell([s[key] for s in stats], fmt)
                                                          for key, _, fmt in COLUMNS) + " |")
    return "\n".join(rows)


def provenance(runs: list[dict], manifest: dict) -> str:
    info = runs[0]["info"]
    shas = sorted({(r["info"].get("git_sha") or "?")[:10] + ("+dirty" if r["info"].get("git_dirty") else "")
                   for r in runs})
    versions = info.get("versions", {})
    lines = [f"- command: `{manifest['command']}`" if manifest.get("command") else None,
             f"- git: {', '.join(shas)}",
             f"- device: {info.get('device', '?')}, world size {info.get('world_size', '?')}",
             "- versions: " + ", ".join(f"{k} {versions[k]}" for k in ("python", "torch", "transformers", "peft")
                                        if k in versions),
             f"- {count(len(runs), 'run')}; mean ± sample standard deviation over seeds; "
             f"tokens/s: mean over logging "
             f"windows after step 1; peak mem: GPU peak allocated, or peak RSS on a CPU"]
    return "\n".join(line for line in lines if line)


def _curves(members: list[dict], key: str) -> tuple[list, list, list, list]:
    """Steps logged by every member, and the mean/min/max of `key` there."""
    per_run = [{m["step"]: m[key] for m in r["metrics"] if m.get(key) is not None} for r in members]
    steps = sorted(set.intersection(*(set(p) for p in per_run)))
    values = [[p[s] for p in per_run] for s in steps]
    return steps, [statistics.fmean(v) for v in values], [min(v) for v in values], [max(v) for v in values]


def plot(runs: list[dict], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    paths = []
    panels = [("loss.png", [("loss", "train", "-"), ("val_loss", "val", "--")], "loss"),
              ("throughput.png", [("tokens_per_s", "", "-")], "tokens/s")]
    for name, series, ylabel in panels:
        fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
        for k, (config, members) in enumerate(group(runs).items()):
            for key, kind, style in series:
                steps, mean, lo, hi = _curves(members, key)
                if name == "throughput.png":  # step 1 holds warm-up (and compilation)
                    steps, mean, lo, hi = (x[1:] for x in (steps, mean, lo, hi))
                if not steps:
                    continue
                line = ax.plot(steps, mean, style, color=f"C{k}", marker="o" if kind == "val" else None,
                               markersize=3, label=f"{config} {kind}".strip())
                ax.fill_between(steps, lo, hi, color=line[0].get_color(), alpha=0.2, linewidth=0)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / name)
        plt.close(fig)
        paths.append(out / name)
    return paths


def wandb_runs(path: str) -> list[dict]:
    """The runs of a W&B group 'entity/project/group' in the shape load_run() gives."""
    try:
        import wandb
    except ImportError:
        raise SystemExit("error: --wandb-group needs the wandb package: pip install wandb") from None
    from core.tracking import WANDB_KEYS

    entity_project, _, group_name = path.rpartition("/")
    if not entity_project or not group_name:
        raise SystemExit(f"error: --wandb-group {path}: expected entity/project/group")
    back = {v: k for k, v in WANDB_KEYS.items()}
    try:
        found = list(wandb.Api().runs(entity_project, filters={"group": group_name}))
    except Exception as e:  # no login (UsageError), an unknown entity or project, no network
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SystemExit(f"error: --wandb-group {path}: W&B answered: {first} (wandb login, or check the "
                         f"entity/project/group)") from None
    runs = []
    for run in found:
        metrics = [{"step": row["_step"], **{back.get(k, k.split("/")[-1]): v for k, v in row.items()
                                             if "/" in k and v is not None}} for row in run.scan_history()]
        config = {k: v for k, v in dict(run.config).items() if k != "run"}
        runs.append({"dir": run.url, "metrics": metrics, "config": config,
                     "info": dict(run.config).get("run", {}), "ablation": {}})
    return runs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("paths", nargs="*", help="run directories, or directories holding them")
    p.add_argument("--wandb-group", help="entity/project/group: compare the runs of a W&B group instead")
    p.add_argument("--out", default=None, help="where results.md and the plots go (default: the first path)")
    args = p.parse_args(argv)
    if not args.paths and not args.wandb_group:
        p.error("give run directories or --wandb-group")
    if missing := [p for p in args.paths if not Path(p).exists()]:
        p.error(f"{missing[0]}: no such directory")
    runs = wandb_runs(args.wandb_group) if args.wandb_group else find_runs(args.paths)
    if not runs:
        print(f"error: no runs (no metrics.jsonl) under {' '.join(args.paths)}", file=sys.stderr)
        return 1
    label_runs(runs)
    runs, notes = left_out(runs)
    if not runs:
        print(f"error: no run to compare\n{notes}", file=sys.stderr)
        return 1
    out = Path(args.out or (args.paths[0] if args.paths else "."))
    out.mkdir(parents=True, exist_ok=True)
    first = args.paths[0] if args.paths else ""
    manifest = read_json(Path(first) / "ablation.json") if first else {}
    title = f"# Ablation: {manifest['name']}" if manifest.get("name") else "# Comparison"
    text = (f"{title}\n\n{provenance(runs, manifest)}\n\n{table(runs)}\n\n{notes}{chr(10) if notes else ''}"
            "![loss](loss.png)\n![throughput](throughput.png)\n")
    (out / "results.md").write_text(text)
    plot(runs, out)
    print(text + f"\nwrote {out / 'results.md'}, {out / 'loss.png'}, {out / 'throughput.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
