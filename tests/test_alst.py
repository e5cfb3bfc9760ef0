"""--alst expands into its flags before validation, keeps explicit choices, logs the recipe, and
(every part being exact) trains like the plain path."""

import pytest

import ranks
from conftest import assert_same_metrics, read_metrics, run_train
from features.alst import expand


def test_alst_turns_on_the_recipe():
    import train

    cfg = train.parse_config(["--alst"])
    assert (cfg.tiled_mlp.tiled_mlp, cfg.loss.loss, cfg.offload.offload, cfg.checkpointing.ac) == \
        (True, "chunked", "cpu", "full")
    assert cfg.alst.turned_on == ["--tiled-mlp", "--loss chunked", "--offload cpu", "--ac full"]
    assert train.parse_config([]).offload.offload == "none"  # nothing without the flag


def test_alst_keeps_explicit_choices():
    import train

    cfg = train.Config()
    cfg.alst.alst, cfg.offload.offload, cfg.checkpointing.ac, cfg.loss.loss = True, "disk", "selective", "liger"
    assert expand(cfg) == ["--tiled-mlp"]
    assert (cfg.offload.offload, cfg.checkpointing.ac, cfg.loss.loss) == ("disk", "selective", "liger")


@pytest.mark.parametrize("argv, fused", [(["--lora"], True), (["--qlora"], True), ([], False),
                                         (["--lora", "--dora"], False), (["--lora", "--lora-dropout", "0.1"], False),
                                         (["--lora-8bit"], False), (["--lora", "--no-lora-kernels"], False)])
def test_alst_fuses_the_adapters_that_the_kernels_compute(argv, fused):
    import train

    cfg = train.parse_config(["--alst", *argv])
    assert cfg.lora_kernels.lora_kernels == fused and ("--lora-kernels" in cfg.alst.turned_on) == fused


def test_alst_with_cp_turns_on_ulysses_when_sequence_parallel_exists():
    import train

    cfg = train.Config()
    cfg.alst.alst = True
    sp = [f for f in vars(cfg).values() if hasattr(f, "sp_mode")]
    if not sp:
        pytest.skip("train.py has no sequence-parallel config yet")
    cfg.mesh.cp = 2
    assert "--sp-mode ulysses" in expand(cfg) and sp[0].sp_mode == "ulysses"


def test_train_py_alst_matches_plain_and_logs(tmp_path, small_data, capsys):
    common = ["--dataset", str(small_data), "--max-steps", "2", "--log-every", "1", "--micro-batch-size", "8",
              "--lora", "--lora-rank", "4"]
    assert run_train(tmp_path / "plain", *common) == 0
    assert run_train(tmp_path / "alst", *common, "--alst", "--tiled-mlp-shards", "2", "--offload-min-kib", "0") == 0
    assert "alst: --tiled-mlp (shards 2), --loss chunked, --offload cpu, --ac full, --lora-kernels (turned on by " \
        "--alst: --tiled-mlp, --loss chunked, --offload cpu, --ac full, --lora-kernels)" in capsys.readouterr().out
    for a, b in zip(read_metrics(tmp_path / "plain"), read_metrics(tmp_path / "alst"), strict=True):
        assert_same_metrics(a, b, ("loss", "val_loss", "grad_norm"), rel=1e-5)


@pytest.mark.slow
def test_alst_under_fsdp_two_ranks_matches_one_process(tmp_path, small_data):
    """The recipe's hooks and Functions under FSDP2 (DTensor parameters, per-block all-gathers): two
    gloo ranks train like one process."""
    common = ["--dataset", str(small_data), "--max-steps", "2", "--log-every", "1", "--packing", "--seq-len", "256",
              "--eval-exact-match", "0", "--seed", "7", "--device", "cpu", "--lora", "--lora-rank", "4", "--alst",
              "--tiled-mlp-shards", "3", "--offload-min-kib", "0", "--skip-export"]
    assert run_train(tmp_path / "one", *common, "--micro-batch-size", "8") == 0
    ranks.train(2, *common, "--micro-batch-size", "4", "--fsdp", "--output-dir", str(tmp_path / "two"))
    for a, b in zip(read_metrics(tmp_path / "two")[1:], read_metrics(tmp_path / "one")[1:], strict=True):
        assert (a["loss"] == pytest.approx(b["loss"], rel=1e-5)
                and a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4))
