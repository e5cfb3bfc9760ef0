"""Weights & Biases tracking: the run's metrics.jsonl mirrored to W&B, with its config, git SHA and code.

    python train.py --wandb --wandb-project my-ablation --run-name lr3e-3 --wandb-tags lr baseline
    WANDB_MODE=offline python train.py --wandb        # no network: `wandb sync runs/<dir>/wandb/...` later

Every record that `core/runlog.py`'s MetricsLog writes goes to W&B too (rank 0 only), at the same step,
with grouped keys: `train/loss`, `train/lr`, `train/grad_norm`; `perf/tokens_per_s`, `perf/mfu`,
`perf/tokens`, `perf/eta_s`; `mem/peak_gib`; `eval/val_loss`, `eval/exact_match`, `eval/seconds`. The
W&B config is the resolved nanotune config plus `run.json` (argv, git SHA, dirty flag, versions,
device); the source (train.py, core/, features/, launch/) is logged as a code artifact and `git.diff` as
a file. W&B's own environment variables apply (WANDB_MODE=offline|disabled, WANDB_API_KEY, WANDB_DIR:
its files go there, else under the run directory).

Reference: cleanrl's `--track` (vwxyzjn/cleanrl), W&B's `wandb.init` / `Run.log` / `Run.log_code`.
Works with every other flag (it only reads the log). Needs `pip install wandb`.
"""

import dataclasses
import json
import os
import secrets
import shutil
from pathlib import Path

from core import UserError

_REPO = Path(__file__).resolve().parent.parent
# metrics.jsonl key -> W&B key; a key not listed here goes under train/ with its own name
WANDB_KEYS = {"loss": "train/loss", "lr": "train/lr", "grad_norm": "train/grad_norm",
         "tokens_per_s": "perf/tokens_per_s", "mfu": "perf/mfu", "tokens": "perf/tokens", "eta_s": "perf/eta_s",
         "peak_mem_gib": "mem/peak_gib", "val_loss": "eval/val_loss", "exact_match": "eval/exact_match",
         "eval_s": "eval/seconds"}


@dataclasses.dataclass
class TrackingConfig:
    wandb: bool = False
    """Mirror the metrics, config, git SHA and code to Weights & Biases (WANDB_MODE=offline works)."""
    wandb_project: str = "nanotune"
    """W&B project."""
    wandb_entity: str | None = None
    """W&B entity (user or team); default: your W&B default entity."""
    run_name: str | None = None
    """Run name shown in W&B; default: the name of --output-dir."""
    wandb_group: str | None = None
    """W&B group (launch/ablate.py sets it to the ablation name; launch/compare.py can read a group)."""
    wandb_tags: tuple[str, ...] = ()
    """W&B tags, space-separated (launch/ablate.py adds the ablation name)."""


def validate(cfg) -> None:
    t = cfg.tracking
    if not t.wandb:
        if t.wandb_entity or t.wandb_group or t.wandb_tags or t.wandb_project != "nanotune":
            raise UserError("--wandb-project / --wandb-entity / --wandb-group / --wandb-tags do nothing without "
                            "--wandb; add --wandb, or drop them")
        return
    try:
        import wandb  # noqa: F401
    except ImportError:
        raise UserError("--wandb needs the wandb package: pip install wandb (or drop --wandb)") from None


def wandb_key(key: str) -> str:
    return WANDB_KEYS.get(key, key if "/" in key else f"train/{key}")


def _source_file(path: str) -> bool:
    """train.py, export.py, core/, features/, launch/: the code a run ran. Read as walked, not through links
    (W&B links its debug log under runs/<run>/wandb/ to a file outside the repository)."""
    try:
        rel = Path(os.path.abspath(path)).relative_to(_REPO).as_posix()
    except ValueError:  # not below the repository
        return False
    return rel in ("train.py", "export.py") or rel.split("/")[0] in ("core", "features", "launch")


class WandbSink:
    """A MetricsLog sink: one `wandb.log` per metrics record, at the record's step."""

    def __init__(self, run):
        self.run = run

    def __call__(self, record: dict) -> None:
        data = {wandb_key(k): v for k, v in record.items() if k != "step" and v is not None}
        self.run.log(data, step=record["step"])

    def close(self) -> None:
        self.run.finish()


def apply_tracking(log, cfg, run_dir: Path) -> None:
    """Start a W&B run for this training run (rank 0: where `log` is enabled) and attach it to `log`.

    cfg is train.py's full Config (its `tracking` field holds the W&B settings); run_dir must already
    hold run.json (train.py writes it before the log starts)."""
    if not log.enabled:
        return
    import wandb

    t = cfg.tracking
    info_path = run_dir / "run.json"
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    run_id = _run_id(run_dir)
    run = wandb.init(project=t.wandb_project, entity=t.wandb_entity, name=t.run_name or run_dir.name,
                     group=t.wandb_group, tags=list(t.wandb_tags),
                     dir=os.environ.get("WANDB_DIR") or str(run_dir),
                     config={**dataclasses.asdict(cfg), "run": info}, resume="allow",
                     id=None if os.environ.get("WANDB_SWEEP_ID") else run_id,  # a sweep's agent names its run
                     settings=wandb.Settings(silent=True))  # W&B's own lines: the log says where the run is
    print(f"wandb: offline run in {Path(run.dir).parent}; `wandb sync` it later" if run.offline else
          f"wandb: {run.url}", flush=True)
    run.log_code(str(_REPO), include_fn=_source_file)
    if (run_dir / "git.diff").is_file():  # a copy in the W&B run's files (run.save would link it, and warn)
        shutil.copy(run_dir / "git.diff", run.dir)
    log.add_sink(WandbSink(run))


def _run_id(run_dir: Path) -> str:
    """One W&B run per run directory, kept in the directory, so a resumed (requeued) run continues it.
    A W&B sweep agent names the run in WANDB_RUN_ID; that id is kept, or the agent loses its run."""
    path = run_dir / "wandb_id.txt"
    if not path.is_file():
        path.write_text(os.environ.get("WANDB_RUN_ID") or secrets.token_hex(4))
    return path.read_text().strip()
