"""Distributed on CPU with gloo: DDP, FSDP2 (also with --fsdp-keep-gathered, which gathers each block
once a step), HSDP, TP, FSDP x TP and DeepSpeed ZeRO 1/2/3 give one process's loss and gradients on
the same global batch (packed); QLoRA + FSDP2 and LoRA + ZeRO-3 match one process (ZeRO-3's adapter export
is gathered whole);
a DCP checkpoint written by 2 FSDP ranks resumes on 1 rank and on 4 (FSDP x TP) with the same next
losses; mesh, flag and DeepSpeed config checks.

Tolerances (fp32): losses to 1e-6 relative, gradients to 1e-6 of the largest gradient entry,
grad norms to 1e-5 relative (only the order of float sums differs between layouts).
"""

import json
import shutil

import pytest
import torch

import dist_worker
import ranks
from conftest import config, read_metrics, run_train
from core import UserError, quantize
from core.distributed import MeshConfig, mesh_shape


def _has_deepspeed() -> bool:
    import importlib.util

    return importlib.util.find_spec("deepspeed") is not None


@pytest.mark.slow
def test_layouts_match_one_process(tmp_path):
    """4 gloo ranks; each layout's step (grad accumulation 2, packing) vs one process on the same rows.
    DeepSpeed ZeRO 1/2/3 run on CPU too (DeepSpeed 0.19.8's CPU accelerator over gloo)."""
    out = tmp_path / "layouts.json"
    layouts = ["ddp:1,4,1,1", "fsdp:1,4,1,1:fsdp", "fsdp_gathered:1,4,1,1:fsdp:gathered", "hsdp:2,2,1,1:fsdp",
               "tp:1,1,1,4", "fsdp_tp:1,2,1,2:fsdp"]
    if _has_deepspeed():
        layouts += ["zero1:zero1", "zero2:zero2", "zero3:zero3", "zero2_overlap:zero2:overlap"]  # zero3 always overlaps
    ranks.run(dist_worker.run, 4, str(out), layouts)
    results = json.loads(out.read_text())
    assert sorted(results) == sorted(layout.split(":")[0] for layout in layouts)
    for name, r in results.items():
        got, want = r["loss"]
        assert got == pytest.approx(want, rel=1e-6), name
        # ZeRO's gradient is read off an SGD update of the weights: + one fp32 rounding of a weight ~1
        slack = 2.4e-7 if name.startswith("zero") else 0.0
        assert r["grad_max_abs_err"] <= 1e-6 * r["grad_max_abs"] + slack, (name, r)
        assert r["norm"][0] == pytest.approx(r["norm"][1], rel=1e-5), name
        assert r["grad_max_abs"] > 0  # gradients were produced, so the comparison means something
    # 2 micro-batches: plain FSDP gathers each block for both forwards and both backwards (the root
    # and the last block stay gathered after forward); --fsdp-keep-gathered gathers every unit once
    units = results["fsdp"]["units"]
    assert results["fsdp"]["all_gathers"] == 2 * (units + units - 2)
    assert results["fsdp_gathered"]["all_gathers"] == units


COMMON = ["--max-steps", "4", "--log-every", "1", "--packing", "--seq-len", "256", "--eval-exact-match", "0",
          "--seed", "7", "--device", "cpu", "--warmup-steps", "2", "--lr", "1e-2"]


@pytest.mark.slow
def test_fsdp_checkpoint_from_2_ranks_resumes_on_1_and_4(tmp_path, small_data):
    """train.py with 2 FSDP ranks x micro-batch 4 saves at step 2; that DCP checkpoint resumes on 1
    plain process (x 8) and on 4 ranks as FSDP x TP (2 x 2, x 4) with the 2-rank run's losses at
    steps 3 and 4 (and the same final validation loss)."""
    data = ["--dataset", str(small_data), *COMMON, "--save-every", "2", "--keep-checkpoints", "0"]
    ranks.train(2, *data, "--micro-batch-size", "4", "--fsdp", "--output-dir", str(tmp_path / "two"))
    two = {m["step"]: m for m in read_metrics(tmp_path / "two")}
    assert (tmp_path / "two" / "final" / "model.safetensors").is_file()  # gathered for the export

    saved = tmp_path / "two" / "checkpoints" / "step_00000002"
    for name in ("res1", "res4"):
        (tmp_path / name / "checkpoints").mkdir(parents=True)
        shutil.copytree(saved, tmp_path / name / "checkpoints" / saved.name)
    resume = ["--dataset", str(small_data), *COMMON, "--resume", "auto", "--skip-export"]
    assert run_train(tmp_path / "res1", *resume, "--micro-batch-size", "8") == 0
    # 4 ranks as 2 dp x 2 tp: the 1-D FSDP shards reshard into a 2-D FSDP x TP layout (2 x 4 rows a step)
    ranks.train(4, *resume, "--micro-batch-size", "4", "--fsdp", "--tp", "2", "--output-dir", str(tmp_path / "res4"))
    for name in ("res1", "res4"):
        got = {m["step"]: m for m in read_metrics(tmp_path / name)}
        assert sorted(got) == [3, 4], name
        for step in (3, 4):
            assert got[step]["loss"] == pytest.approx(two[step]["loss"], rel=1e-5), (name, step)
            assert got[step]["tokens"] == two[step]["tokens"], (name, step)
        assert got[4]["val_loss"] == pytest.approx(two[4]["val_loss"], rel=1e-5), name


@pytest.mark.slow
def test_fsdp_export_of_tied_embeddings_is_the_one_process_export(tmp_path, small_data):
    """A model that ties its head to its embeddings (tiny-qwen2, as SmolLM2 and Llama 3.2): the weights
    gathered from 2 FSDP ranks save as one process saves them, the head not written as a second table."""
    from safetensors.torch import load_file

    common = ["--model", "tiny-qwen2", "--dataset", str(small_data), *COMMON, "--max-steps", "2"]
    assert run_train(tmp_path / "one", *common, "--micro-batch-size", "8") == 0
    ranks.train(2, *common, "--micro-batch-size", "4", "--fsdp", "--output-dir", str(tmp_path / "two"))
    one, two = (load_file(tmp_path / n / "final" / "model.safetensors") for n in ("one", "two"))
    assert sorted(two) == sorted(one) and "lm_head.weight" not in one
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-4, atol=1e-5)  # two steps, sums in another order


def test_sharded_evaluation_scores_every_sample_as_one_process_does(tmp_path, small_data):
    """3 validation samples on 2 FSDP ranks (forwards are collective, so the ranks run as many): the
    one-process validation loss and exact match, every sample scored, none dropped."""
    val = small_data.parent / "val.jsonl"
    val.write_text("\n".join(val.read_text().splitlines()[:3]) + "\n")
    common = ["--dataset", str(small_data), "--max-steps", "1", "--seq-len", "256", "--seed", "7", "--device", "cpu",
              "--eval-exact-match", "3", "--skip-export"]
    assert run_train(tmp_path / "one", *common, "--micro-batch-size", "8") == 0
    ranks.train(2, *common, "--micro-batch-size", "4", "--fsdp", "--output-dir", str(tmp_path / "two"))
    one, two = read_metrics(tmp_path / "one")[0], read_metrics(tmp_path / "two")[0]
    assert two["val_loss"] == pytest.approx(one["val_loss"], rel=1e-6)
    assert two["exact_match"] == one["exact_match"]


def test_qlora_fsdp_preset_base_is_stored_in_a_float_dtype(tok):
    """--qlora --fsdp on a preset: every parameter of the 4-bit base is a float tensor (bf16 storage of
    the packed bytes), which torch 2.11's fully_shard needs; without --fsdp the storage stays uint8."""
    import torch

    from features import fsdp, lora
    from core.model import ModelConfig, load_config, load_model

    def base_dtypes(sharding):
        qconfig = fsdp.quantization_storage(quantize.quantization_config(lora.LoraConfig(qlora=True)), sharding)
        cfg = ModelConfig("tiny-llama")
        model = load_model(cfg, load_config(cfg, tok), torch.device("cpu"), quantization_config=qconfig)
        return {p.dtype for name, p in model.named_parameters() if "proj" in name}

    assert base_dtypes(fsdp.ShardingConfig(fsdp=True)) == {torch.bfloat16}
    assert base_dtypes(fsdp.ShardingConfig()) == {torch.uint8}


@pytest.mark.slow
def test_qlora_fsdp_two_ranks_match_one_process(tmp_path, small_data):
    """QLoRA + FSDP2: the 4-bit base (bitsandbytes on CPU) and the adapters sharded over 2 ranks train
    like one process; the export gathers the packed 4-bit weights back for the adapter + base files."""
    common = ["--dataset", str(small_data), "--max-steps", "2", "--log-every", "1", "--packing", "--seq-len", "256",
              "--eval-exact-match", "0", "--seed", "7", "--device", "cpu", "--qlora", "--lora-rank", "4"]
    assert run_train(tmp_path / "one", *common, "--micro-batch-size", "8", "--skip-export") == 0
    ranks.train(2, *common, "--micro-batch-size", "4", "--fsdp", "--output-dir", str(tmp_path / "two"))
    one, two = read_metrics(tmp_path / "one")[1:], read_metrics(tmp_path / "two")[1:]
    for a, b in zip(two, one, strict=True):
        assert (a["loss"] == pytest.approx(b["loss"], rel=1e-5)
                and a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4))
    assert (tmp_path / "two" / "final" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "two" / "final" / "base" / "model.safetensors").is_file()


def test_fsdp_keep_gathered_trains_like_fsdp(tmp_path, small_data):
    """train.py on 2 ranks, 2 micro-batches a step, validation and a checkpoint in between: keeping the
    weights gathered across micro-batches changes when FSDP communicates, not what it computes."""
    common = ["--dataset", str(small_data), *COMMON, "--micro-batch-size", "2", "--grad-accum", "2", "--fsdp",
              "--eval-every", "2", "--save-every", "2", "--skip-export"]
    ranks.train(2, *common, "--output-dir", str(tmp_path / "plain"))
    ranks.train(2, *common, "--fsdp-keep-gathered", "--output-dir", str(tmp_path / "gathered"))
    plain, gathered = read_metrics(tmp_path / "plain"), read_metrics(tmp_path / "gathered")
    assert [m["step"] for m in gathered] == [m["step"] for m in plain] and len(plain) > 4
    for a, b in zip(gathered, plain):
        assert a.keys() & {"loss", "grad_norm", "val_loss"} == b.keys() & {"loss", "grad_norm", "val_loss"}
        for key in a.keys() & {"loss", "grad_norm", "val_loss"}:
            assert a[key] == pytest.approx(b[key], rel=1e-6), (key, a, b)
    assert sum("val_loss" in m for m in plain) >= 2 and sum("grad_norm" in m for m in plain) == 4


def test_adamw_sr_on_fsdp_shards_resumes_exactly(tmp_path, small_data):
    """--optimizer adamw-sr on 2 FSDP ranks: bf16 weight shards, fp32 moments that keep their dtype through the
    DCP checkpoint, and after resuming at step 2 the same losses (each rank's rounding stream comes back with
    its RNG state)."""
    common = ["--dataset", str(small_data), *COMMON, "--micro-batch-size", "4", "--fsdp", "--optimizer", "adamw-sr",
              "--skip-export"]
    ranks.train(2, *common, "--save-every", "2", "--keep-checkpoints", "0", "--output-dir", str(tmp_path / "full"))
    saved = tmp_path / "full" / "checkpoints" / "step_00000002"
    (tmp_path / "cut" / "checkpoints").mkdir(parents=True)
    shutil.copytree(saved, tmp_path / "cut" / "checkpoints" / saved.name)
    ranks.train(2, *common, "--resume", "auto", "--output-dir", str(tmp_path / "cut"))
    full, cut = ({m["step"]: m for m in read_metrics(tmp_path / run) if "loss" in m} for run in ("full", "cut"))
    assert full[4]["loss"] < full[1]["loss"] and sorted(cut) == [3, 4]
    for step in (3, 4):
        assert cut[step]["loss"] == full[step]["loss"] and cut[step]["grad_norm"] == full[step]["grad_norm"], step


def _deepspeed_cpu_refused() -> str | None:
    """core/compat.py's reason when its matrix marks --deepspeed CUDA-only (DeepSpeed 0.19.8 runs
    on CPU over gloo: the layouts test shows it), else None."""
    from core import compat

    row = next((f for f in compat.FEATURES if f.flag == "--deepspeed"), None) if hasattr(compat, "FEATURES") else None
    return getattr(row, "cuda", "") or None


@pytest.mark.slow
def test_deepspeed_zero3_train_and_resume_through_its_checkpoints(tmp_path, small_data):
    """train.py --deepspeed zero3 on 2 ranks: one process's losses; its step-2 checkpoint (DeepSpeed's
    format) resumes on 2 ranks with the same losses at steps 3 and 4; ZeRO-3 weights gathered for export."""
    if not _has_deepspeed():
        pytest.skip("pip install deepspeed")
    if reason := _deepspeed_cpu_refused():
        pytest.skip(f"core/compat.py refuses --deepspeed on CPU ({reason})")
    data = ["--dataset", str(small_data), *COMMON, "--save-every", "2", "--keep-checkpoints", "0"]
    assert run_train(tmp_path / "one", *data, "--micro-batch-size", "8", "--skip-export") == 0
    ranks.train(2, *data, "--micro-batch-size", "4", "--deepspeed", "zero3", "--output-dir", str(tmp_path / "ds"))
    one, ds = ({m["step"]: m for m in read_metrics(tmp_path / n)} for n in ("one", "ds"))
    for step in (1, 2, 3, 4):
        assert ds[step]["loss"] == pytest.approx(one[step]["loss"], rel=1e-5), step
        assert ds[step]["grad_norm"] == pytest.approx(one[step]["grad_norm"], rel=1e-4), step
    assert (tmp_path / "ds" / "checkpoints" / "step_00000002" / "deepspeed").is_dir()
    assert (tmp_path / "ds" / "final" / "model.safetensors").is_file()
    (tmp_path / "res" / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "ds" / "checkpoints" / "step_00000002",
                    tmp_path / "res" / "checkpoints" / "step_00000002")
    ranks.train(2, "--dataset", str(small_data), *COMMON, "--resume", "auto", "--skip-export",
                "--micro-batch-size", "4", "--deepspeed", "zero3", "--output-dir", str(tmp_path / "res"))
    res = {m["step"]: m for m in read_metrics(tmp_path / "res")}
    assert sorted(res) == [3, 4] and all(res[s]["loss"] == pytest.approx(ds[s]["loss"], rel=1e-5) for s in (3, 4))


def test_deepspeed_zero3_lora_matches_one_process_and_exports_the_adapter(tmp_path, small_data):
    """LoRA under ZeRO-3 on 2 ranks: one process's losses and gradient norms, and the exported adapter
    (gathered from the partitions) has the same tensors, shapes and values as the one-process export.
    Through a json config that partitions every parameter, as ZeRO-3 does an 8B's (tiny-llama's are
    under the default persistence threshold): each decoder block is gathered whole (a ZeRO-3 leaf),
    which needs the first block's input to require a gradient under frozen embeddings."""
    from safetensors.torch import load_file

    if not _has_deepspeed():
        pytest.skip("pip install deepspeed")
    if reason := _deepspeed_cpu_refused():
        pytest.skip(f"core/compat.py refuses --deepspeed on CPU ({reason})")
    data = ["--dataset", str(small_data), *COMMON, "--lora", "--lora-rank", "4", "--val-dataset", "none"]
    assert run_train(tmp_path / "one", *data, "--micro-batch-size", "8") == 0
    config = tmp_path / "zero3.json"
    config.write_text(json.dumps({"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}))
    ranks.train(2, *data, "--micro-batch-size", "4", "--deepspeed", str(config), "--output-dir", str(tmp_path / "ds"))
    one, ds = ([m for m in read_metrics(tmp_path / n) if "loss" in m] for n in ("one", "ds"))
    assert [m["step"] for m in ds] == [m["step"] for m in one] == [1, 2, 3, 4]
    for a, b in zip(ds, one):
        assert (a["loss"] == pytest.approx(b["loss"], rel=1e-5)
                and a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4))
    want, got = (load_file(tmp_path / n / "final" / "adapter_model.safetensors") for n in ("one", "ds"))
    assert got.keys() == want.keys() and any("lora_B" in k for k in want)
    for name in want:  # whole, not one rank's partition; AdamW divides by sqrt(v), so gradients that differ
        # in their last bits (another order of float sums) move a weight by up to ~1e-6 over 4 steps at lr 1e-2
        torch.testing.assert_close(got[name], want[name], rtol=1e-3, atol=2e-6)
    assert max(want[k].abs().max() for k in want if "lora_B" in k) > 0


def test_mesh_shape_infers_dp_shard_and_refuses_bad_products():
    assert mesh_shape(MeshConfig(), 1) == (1, 1, 1, 1)
    assert mesh_shape(MeshConfig(dp_replicate=2, tp=2), 8) == (2, 2, 1, 2)
    assert mesh_shape(MeshConfig(dp_shard=2, cp=2), 4) == (1, 2, 2, 1)
    with pytest.raises(UserError, match="--tp 3: --dp-replicate x --cp x --tp = 3 does not divide the world size 8"):
        mesh_shape(MeshConfig(tp=3), 8)
    with pytest.raises(UserError, match=r"--tp 2 needs 2 processes and this is one; launch with torchrun "
                                        r"--nproc_per_node 2 train.py"):
        mesh_shape(MeshConfig(tp=2), 1)
    with pytest.raises(UserError, match="needs 8 processes and this is one"):
        mesh_shape(MeshConfig(dp_shard=2, cp=2, tp=2), 1)
    with pytest.raises(UserError, match="--tp 2 does not multiply to the world size 8; .* --dp-shard -1 to infer"):
        mesh_shape(MeshConfig(dp_shard=2, tp=2), 8)


@pytest.mark.parametrize("flags, message", [
    (dict(fsdp=True, ddp=True), "--fsdp and --ddp"),
    (dict(ddp=True, tp=2), "--ddp replicates whole modules"),
    (dict(fsdp_keep_gathered=True), "--fsdp-keep-gathered needs --fsdp"),
    (dict(fsdp_reduce_dtype="bf16"), "--fsdp-reduce-dtype bf16 needs --fsdp"),
    (dict(tp=0), "--tp must be >= 1"),
    (dict(dp_shard=-2), "--dp-shard must be >= 1 or -1"),
])
def test_bad_flags_are_refused(flags, message):
    import train  # pairs through core/compat.py's matrix, values through core/distributed.py's and fsdp's validate

    cfg = config(**{("mesh." if k in ("tp", "dp_shard") else "sharding.") + k: v for k, v in flags.items()})
    with pytest.raises(UserError, match=message):
        train.validate(cfg)

    argv = [f"--{k.replace('_', '-')}" if v is True else f"--{k.replace('_', '-')}={v}" for k, v in flags.items()]
    with pytest.raises(UserError):
        train.parse_config(argv)


@pytest.mark.parametrize("world, argv, message", [
    ("4", ["--tp", "2"], "--tp 2 with 2 data-parallel ranks needs --fsdp"),
    ("2", ["--lora", "--offload-embeddings"], "--offload-embeddings runs in one process"),
])
def test_layouts_of_the_launched_processes_are_refused_before_anything_loads(monkeypatch, world, argv, message):
    import train

    monkeypatch.setenv("WORLD_SIZE", world)  # as torchrun sets it: known at start-up
    with pytest.raises(UserError, match=message):
        train.parse_config(argv)
    monkeypatch.setenv("WORLD_SIZE", "1")
    train.parse_config(argv if "--tp" not in argv else [])  # one process: the same flags start


def test_a_collective_broken_by_an_exited_rank_is_one_line():
    from core.distributed import peer_failure

    gloo = RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:49885: "
                        "Connection reset by peer")
    assert peer_failure(gloo).endswith("another rank exited first (its error says why)")
    assert peer_failure(RuntimeError("CUDA error: an illegal memory access")) is None


def test_the_samples_an_epoch_leaves_out_are_said_for_one_process_and_for_ranks():
    from core.batches import StepBatches
    from core.records import Sample

    samples = [Sample([1, 2, 3], [1, 2, 3], 0)] * 10
    one = StepBatches(samples, 2, 2, seed=0, pad_id=0).describe(2)
    ranks = StepBatches(samples, 2, 1, seed=0, pad_id=0, rank=0, world_size=2).describe(2)
    assert "2 steps an epoch (2 samples an epoch left out to keep every step full), 2 in all" in one
    assert "(2 samples an epoch left out to keep every step full on every rank)" in ranks


def test_resume_refuses_a_changed_number_of_rows_a_step():
    """The data position is a step count: it names the same rows only at the same rows a step."""
    from core.batches import StepBatches
    from core.data import Sample

    samples = [Sample([1, 2, 3], [1, 2, 3], 0)] * 64
    saved = StepBatches(samples, 2, 2, seed=0, pad_id=0, rank=0, world_size=2)  # 8 rows a step
    saved.step_in_epoch = 3
    state = saved.state_dict()
    StepBatches(samples, 4, 2, seed=0, pad_id=0).load_state_dict(state)  # 1 rank x 4 x 2: the same 8
    with pytest.raises(UserError, match="trained 8 rows a step and this run would train 4 .*pass --grad-accum 4"):
        StepBatches(samples, 2, 2, seed=0, pad_id=0).load_state_dict(state)
    with pytest.raises(UserError, match="pass --micro-batch-size 1"):
        StepBatches(samples, 3, 8, seed=0, pad_id=0).load_state_dict(state)


def test_deepspeed_config_from_flags_and_json(tmp_path):
    import train
    from core import compat
    from features.deepspeed_zero import DeepSpeedConfig, build_config, validate

    ds = build_config(DeepSpeedConfig("zero3", ds_offload=True), 4, 2, 1.0, "bf16", dp_size=8)
    assert ds["zero_optimization"]["stage"] == 3 and ds["bf16"]["enabled"]
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"],
            ds["train_batch_size"]) == (8, 1, 64)
    assert ds["gradient_clipping"] == 1.0 and ds["managed_gradient_accumulation"] is False
    assert "offload_param" not in (
        build_config(DeepSpeedConfig("zero2", True), 1, 1, 0.0, "fp32", 1)["zero_optimization"])
    overlaps = {(stage, flag): build_config(DeepSpeedConfig(stage, ds_overlap_comm=flag), 1, 1, 0.0, "fp32", 1)
                ["zero_optimization"]["overlap_comm"] for stage in ("zero2", "zero3") for flag in (False, True)}
    assert overlaps == {("zero2", False): False, ("zero2", True): True, ("zero3", False): True, ("zero3", True): True}
    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"zero_optimization": {"stage": 2, "reduce_bucket_size": 5e7},
                                "train_batch_size": 999}))
    validate(config(deepspeed=DeepSpeedConfig(str(user))))
    ds = build_config(DeepSpeedConfig(str(user)), 2, 1, 0.5, "fp32", dp_size=2)
    assert ds["zero_optimization"] == {"stage": 2, "reduce_bucket_size": 5e7}  # the user's own settings kept
    assert ds["train_batch_size"] == 4 and ds["gradient_clipping"] == 0.5  # the batch plan's keys win
    with pytest.raises(UserError, match="--ds-overlap-comm with --deepspeed .*ds.json: .* set overlap_comm there"):
        validate(config(deepspeed=DeepSpeedConfig(str(user), ds_overlap_comm=True)))
    with pytest.raises(UserError, match="--ds-offload with --deepspeed .*ds.json: .* offload_param there"):
        validate(config(deepspeed=DeepSpeedConfig(str(user), ds_offload=True)))
    with pytest.raises(UserError, match="pass zero1, zero2, zero3"):
        validate(config(deepspeed=DeepSpeedConfig("zero4")))
    # what --deepspeed cannot run with, or without: core/compat.py's matrix, as train.py checks it
    with pytest.raises(UserError, match="--fsdp with --deepspeed: DeepSpeed's engine owns data parallelism"):
        compat.check(config(**{"deepspeed.deepspeed": "zero2", "sharding.fsdp": True}), cuda=True)
    with pytest.raises(UserError, match="--ds-offload needs --deepspeed"):
        train.validate(config(**{"deepspeed.ds_offload": True}))


def test_tp_refuses_indivisible_heads_lora_dropout_and_compiled_checkpoints():
    from core.model import ModelConfig, load_config, load_tokenizer
    from features.tensor_parallel import check_model

    config = load_config(ModelConfig(path="tiny-llama"), load_tokenizer(ModelConfig()))
    check_model(4, config)  # 4 heads, 4 kv heads
    check_model(1, config, lora_dropout=0.1)  # no tp: nothing shared
    with pytest.raises(UserError, match="--tp 3 must divide the attention heads"):
        check_model(3, config)
    with pytest.raises(UserError, match="--lora-dropout 0.1 with --tp 2: .* use --lora-dropout 0 with --tp"):
        check_model(2, config, lora_dropout=0.1)
    check_model(2, config, ac="full")  # each alone works (checked on 4 ranks)
    check_model(2, config, compiled=True)
    with pytest.raises(UserError, match="--tp 2 with --ac selective and --compile: .* drop --compile or --ac"):
        check_model(2, config, ac="selective", compiled=True)


def test_deepspeed_bf16_mixed_keeps_autocast():
    from features.deepspeed_zero import DeepSpeedConfig, build_config

    on = build_config(DeepSpeedConfig("zero2"), 1, 1, 1.0, "bf16-mixed", dp_size=1)["torch_autocast"]
    assert on == {"enabled": True, "dtype": "bfloat16"}
    assert not build_config(DeepSpeedConfig("zero2"), 1, 1, 1.0, "fp32", dp_size=1)["torch_autocast"]["enabled"]
