"""Sequence parallelism (features/sequence_parallel.py, ring_attention.py): Ulysses and ring over
2 and 4 gloo processes give the same loss and gradients as one process on the same packed
documents; ring attention never lets a document see another; shards cover every token once.
GPU (marked): train.py on all N GPUs with --cp N, Ulysses and ring, matches one GPU on the same
packed documents (fp32 1e-4, bf16 2e-2 relative); `bash benchmarks/gpu_distributed.sh sp` runs it."""

import json

import pytest
import torch

import ranks
import sp_worker
from conftest import config as train_config, read_metrics, run_train
from core import UserError
from features import sequence_parallel as sp
from core.loss import IGNORE, shifted_targets
from features.ring_attention import shard_index

# fp64 everywhere: sdpa and ring agree with one process to ~1e-12; eager's softmax is fp32 inside
# transformers, so its tolerance is that of fp32
TOL = {"sdpa": 1e-9, "eager": 1e-5}


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("mode", ["ulysses", "ring"])
def test_shards_cover_each_token_once_with_shifted_targets(world, mode):
    batch = sp_worker.packed_batch()  # width 50: padded to a multiple of P (ulysses) or 2P (ring)
    shards = [sp.shard_batch(batch, r, world, mode) for r in range(world)]
    width = shards[0]["input_ids"].shape[1] * world
    assert width % (2 * world if mode == "ring" else world) == 0 and 0 <= width - 50 < 2 * world
    order = torch.cat([shard_index(width, r, world, mode == "ring") for r in range(world)])
    assert sorted(order.tolist()) == list(range(width))
    if mode == "ring":  # zig-zag: rank 0 holds the first and the last chunk
        c = width // (2 * world)
        assert order[:2 * c].tolist() == list(range(c)) + list(range(width - c, width))
    targets = torch.full((2, width), IGNORE)
    ids = torch.zeros((2, width), dtype=torch.long)
    targets[:, order], ids[:, order] = torch.cat([s["shift_labels"] for s in shards], 1), \
        torch.cat([s["input_ids"] for s in shards], 1)
    assert torch.equal(targets[:, :50], shifted_targets(batch["labels"]))  # the full row's next tokens
    assert (targets[:, 50:] == IGNORE).all() and torch.equal(ids[:, :50], batch["input_ids"])
    assert (sum(int((s["shift_labels"] != IGNORE).sum()) for s in shards)
            == int((batch["labels"][:, 1:] != IGNORE).sum()))


@pytest.mark.parametrize("attn_impl", ["sdpa", "flash_attention_4", "flex_attention"])
def test_wrapper_names_are_accepted_by_transformers(attn_impl):
    """A name with "flash" in it sent transformers looking for a hub kernel: the flash rows of the
    2-GPU check failed at start on the H200s (results/2026-11-29-sequence-parallel-2xh200.md)."""
    from transformers import AttentionInterface, LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2))
    name = sp.attention_name("ulysses", attn_impl)
    AttentionInterface.register(name, AttentionInterface()["sdpa"])
    model.set_attn_implementation(name)
    assert model.config._attn_implementation == name


def test_flags_and_head_counts_are_checked_at_start():
    import train  # the flags --sp-mode needs and refuses: core/compat.py's matrix

    with pytest.raises(UserError, match="--sp-mode ulysses needs --cp N"):
        train.validate(train_config(**{"sequence_parallel.sp_mode": "ulysses", "mesh.cp": 1}))
    with pytest.raises(UserError, match="--cp 2 needs --sp-mode ulysses or --sp-mode ring"):
        train.validate(train_config(**{"mesh.cp": 2}))
    train.validate(train_config(**{"sequence_parallel.sp_mode": "ring", "mesh.cp": 4}))
    with pytest.raises(UserError, match="--tp 2 with --cp 2: sequence parallel over tensor-parallel heads"):
        train.validate(train_config(**{"sequence_parallel.sp_mode": "ring", "mesh.cp": 2, "mesh.tp": 2}))
    config = sp_worker.new_model("tiny-qwen2").config  # 4 attention heads, 2 key-value heads
    with pytest.raises(UserError, match="--sp-mode ulysses .* this model has 4; use a --cp that divides 4"):
        sp._check_heads(config, sp.SequenceParallelConfig("ulysses"), 3)
    sp._check_heads(config, sp.SequenceParallelConfig("ulysses"), 4)  # key-value heads repeated
    sp._check_heads(config, sp.SequenceParallelConfig("ring"), 3)


def _spawn(world, cases, tmp_path) -> dict:
    out = tmp_path / "sp.json"
    ranks.run(sp_worker.run, world, str(out), cases)  # forked from a warm server (tests/ranks.py)
    return json.loads(out.read_text())


@pytest.mark.parametrize("world,cases", [
    (2, ["tiny-llama/ulysses/sdpa", "tiny-llama/ulysses/eager", "tiny-llama/ring/sdpa",
         "tiny-qwen2/ulysses/sdpa", "tiny-qwen2/ring/sdpa",         # grouped-query attention
         "tiny-mistral/ulysses/sdpa", "tiny-mistral/ring/sdpa",     # sliding window (16 < a document)
         "tiny-llama/ulysses/sdpa/single", "tiny-llama/ring/sdpa/single"]),  # one document per row: no mask
    (4, ["tiny-llama/ulysses/sdpa", "tiny-llama/ring/sdpa",
         "tiny-qwen2/ulysses/sdpa", "tiny-qwen2/ulysses/eager", "tiny-qwen2/ring/sdpa"]),  # 2 kv heads < 4 ranks
])
def test_ulysses_and_ring_match_one_process(world, cases, tmp_path):
    results = _spawn(world, cases, tmp_path)
    leak = results.pop("ring_leak")
    # changing document 0's keys/values moves nothing of document 1 ... unless boundaries are ignored
    assert leak["moved_with_documents"] == 0.0 and leak["moved_without_documents"] > 1e-3
    assert leak["dense_err"] < 1e-12
    assert sorted(results) == sorted(cases)
    for name, r in results.items():
        tol = TOL[name.split("/")[2]]
        got, want = r["loss"]
        assert abs(got - want) <= tol * abs(want), (name, r)
        assert r["grad_err"] <= tol * r["grad_max"], (name, r)
        assert r["eval_rel_err"] <= 1e-12, (name, r)  # evaluation runs unsharded


def test_train_py_with_cp_2_matches_one_process(tmp_path, small_data):
    """train.py end to end: 2 ranks x --cp 2 (one data-parallel rank) == one process, packed rows,
    ring, and Ulysses with --ac full and --loss chunked; evaluation (unsharded) and the trained-token
    counts agree too. fp32: tolerance 1e-5."""
    common = ["--dataset", str(small_data), "--max-steps", "2", "--log-every", "1", "--seed", "5", "--device", "cpu",
              "--packing", "--seq-len", "256", "--micro-batch-size", "2", "--skip-export"]
    assert run_train(tmp_path / "one", *common, "--eval-exact-match", "4") == 0  # exact match runs unsharded too
    one = read_metrics(tmp_path / "one")
    assert "exact_match" in one[0] and "exact_match" in one[-1] and "val_loss" in one[-1]
    for name, extra in (("ring", ["--sp-mode", "ring"]),
                        ("ulysses", ["--sp-mode", "ulysses", "--ac", "full", "--loss", "chunked"])):
        ranks.train(2, *common, "--eval-exact-match", "4", "--cp", "2", *extra, "--output-dir", str(tmp_path / name))
        cp2 = read_metrics(tmp_path / name)
        assert [m["step"] for m in cp2] == [m["step"] for m in one] == [0, 1, 2]
        for a, b in zip(cp2, one):
            for key in ("loss", "grad_norm", "val_loss", "exact_match"):
                if key in b:
                    assert a[key] == pytest.approx(b[key], rel=1e-5), (name, key, a, b)
            assert a.get("tokens") == b.get("tokens")


def _gpu_count() -> int:
    """The GPUs the N-GPU check uses: all of them (a power of two up to 8, which divides
    llama3.2-1b's 32 attention and 8 key-value heads)."""
    n = min(torch.cuda.device_count(), 8)
    return 1 << (n.bit_length() - 1) if n else 0


_ONE_GPU: dict = {}  # (attn, precision) -> the one-GPU run's metrics, shared by the cases that compare to it


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
@pytest.mark.parametrize("mode,attn,precision,rel", [
    ("ulysses", "sdpa", "fp32", 1e-4), ("ring", "sdpa", "fp32", 1e-4),
    ("ulysses", "flash", "bf16", 2e-2), ("ring", "flash", "bf16", 2e-2),  # bf16: reduction order differs
    ("ulysses", "flex", "bf16", 2e-2),
])
def test_gpu_n_gpus_match_one(mode, attn, precision, rel, tmp_path, tmp_path_factory, small_data):
    """train.py on all N GPUs (N = 2, 4 or 8) with --cp N == 1 GPU on the same packed rows (documents
    of the embedded data, several per 512-token row, so every row has document boundaries), the same
    --attn and precision, 3 steps: train loss of each step and the validation loss (run unsharded)
    within `rel` (fp32 1e-4, bf16 2e-2 relative). Ring runs its own attention math (--attn picks the
    one-GPU reference and evaluation). NVLink multicast off in every process."""
    import os
    import signal
    import subprocess
    import sys

    from conftest import ROOT

    n = _gpu_count()
    common = [str(ROOT / "train.py"), "--dataset", str(small_data), "--max-steps", "3", "--log-every", "1",
              "--seed", "5", "--packing", "--seq-len", "512", "--micro-batch-size", "2", "--skip-export",
              "--eval-exact-match", "0", "--attn", attn, "--precision", precision, "--model", "llama3.2-1b"]
    env = dict(os.environ, NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1", NVSHMEM_DISABLE_NVLS="1")
    def run(cmd):  # its own process group: a timeout ends torchrun's workers too (they hold the GPUs)
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
        try:
            _, err = proc.communicate(timeout=420)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            _, err = proc.communicate()
        assert proc.returncode == 0, err[-3000:]

    if (attn, precision) not in _ONE_GPU:
        one_dir = tmp_path_factory.mktemp(f"one-{attn}-{precision}")
        run([sys.executable, *common, "--output-dir", str(one_dir)])
        _ONE_GPU[(attn, precision)] = read_metrics(one_dir)
    run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n), *common,
         "--cp", str(n), "--sp-mode", mode, "--output-dir", str(tmp_path / "many")])
    a, b = read_metrics(tmp_path / "many"), _ONE_GPU[(attn, precision)]
    print(f"{mode} {attn} {precision}: {n} GPUs: losses {[m.get('loss') for m in a]} vs 1 GPU "
          f"{[m.get('loss') for m in b]}; val {a[-1].get('val_loss')} vs {b[-1].get('val_loss')} (rel {rel})")
    assert [m["step"] for m in a] == [m["step"] for m in b] == [0, 1, 2, 3]
    for x, y in zip(a, b, strict=True):
        assert x.get("tokens") == y.get("tokens"), (x, y)  # the same documents
        for key in ("loss", "val_loss"):
            if key in y:
                assert x[key] == pytest.approx(y[key], rel=rel), (key, x, y)


def test_the_attention_line_says_how_the_ranks_share_a_row():
    plain = train_config()
    assert sp.describe(plain, "sdpa") == "sdpa"
    ring = train_config(**{"sequence_parallel.sp_mode": "ring", "mesh.cp": 2})
    assert sp.describe(ring, "sdpa") == ("--sp-mode ring over 2 ranks (each holds 1/2 of a row): its own "
                                         "online-softmax math, not --attn")
    ulysses = train_config(**{"sequence_parallel.sp_mode": "ulysses", "mesh.cp": 4})
    assert sp.describe(ulysses, "FlashAttention-4 (flash_attn.cute)").startswith(
        "FlashAttention-4 (flash_attn.cute) on whole rows, --sp-mode ulysses over 4 ranks")
