"""DeepSpeed ZeRO keeps nanotune's precisions: under --precision bf16 (pure bf16) the weight partitions
and AdamW states it hands to the optimizer are bf16, under bf16-mixed fp32 (DeepSpeed's plain bf16
mode kept fp32 master weights and states: a mixed-precision update, 0.48 off the plain loss by step 6
on 2 H200s); zero2 / zero3 on 2 gloo ranks track the plain bf16 run as closely as --fsdp does; MFU's
FLOPs count ZeRO-3's partitioned parameters by their full size (ds_numel), not their empty storage.
LoRA under --precision bf16 keeps fp32 adapter masters and AdamW states, as the plain run's fp32
adapters do (bf16 ones ran 0.04 off the plain loss by step 6 on 2 H200s).

_worker is the dtype test's one rank (a one-rank gloo group, forked by tests/ranks.py); by hand:
`RANK=0 LOCAL_RANK=0 WORLD_SIZE=1 python tests/test_deepspeed_precision.py OUT.json`.
"""

import importlib.util
import json
import sys
import warnings
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ranks  # noqa: E402
from conftest import ROOT, bf16_deviations  # noqa: E402

pytestmark = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="pip install deepspeed")
# stage, precision, --ds-offload, --lora
CASES = [("zero1", "bf16", False, False), ("zero2", "bf16", False, False), ("zero3", "bf16", False, False),
         ("zero2", "bf16-mixed", False, False), ("zero3", "bf16-mixed", False, False), ("zero2", "bf16", True, False),
         ("zero2", "bf16", False, True), ("zero3", "bf16", False, True)]


def test_bf16_section_from_the_flags(tmp_path):
    from features.deepspeed_zero import DeepSpeedConfig, build_config

    def bf16(precision, offload=False, deepspeed="zero2"):
        return build_config(DeepSpeedConfig(deepspeed, offload), 1, 1, 1.0, precision, dp_size=1)["bf16"]

    for stage in ("zero1", "zero2", "zero3"):
        assert bf16("bf16", deepspeed=stage) == {"enabled": True, "bf16_master_weights_and_grads": True,
                                                 "bf16_optimizer_states": True}, stage
        lora = build_config(DeepSpeedConfig(stage), 1, 1, 1.0, "bf16", dp_size=1, adapters=True)["bf16"]
        assert lora == {"enabled": True}, stage  # fp32 adapter masters and states
    assert bf16("bf16-mixed") == bf16("fp32") == {"enabled": False}  # fp32 weights: fp32 masters and states
    with pytest.warns(UserWarning, match="--ds-offload with --precision bf16: DeepSpeed keeps fp32 master"):
        assert bf16("bf16", offload=True) == {"enabled": True}  # 0.19.8: bf16 masters offloaded need DeepSpeedCPUAdam
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bf16("bf16-mixed", offload=True)
    user = tmp_path / "ds.json"  # a json config's own bf16 section is kept as written
    user.write_text(json.dumps({"zero_optimization": {"stage": 2}, "bf16": {"enabled": True}}))
    assert bf16("bf16", deepspeed=str(user)) == {"enabled": True}


@pytest.fixture(scope="module")
def engines(tmp_path_factory) -> dict:
    """This file's worker, once: {case: the dtypes and FLOPs it read off the engine} (see _worker)."""
    out = tmp_path_factory.mktemp("engines") / "engines.json"
    ranks.run(_worker, 1, str(out))  # its own process: DeepSpeed's engines keep global state
    return json.loads(out.read_text())


def test_optimizer_states_follow_the_precision(engines):
    """nanotune's AdamW under the engine after one step: its exp_avg / exp_avg_sq dtypes. The weight
    partitions DeepSpeed hands it have the same dtype (torch's AdamW makes states like its params)."""
    got = engines
    assert got["zero1-bf16"]["states"] == got["zero2-bf16"]["states"] == got["zero3-bf16"]["states"] == ["bfloat16"]
    assert got["zero2-bf16-mixed"]["states"] == got["zero3-bf16-mixed"]["states"] == ["float32"]
    assert got["zero2-bf16-offload"]["states"] == ["float32"]  # the documented exception (see the config test)
    assert got["zero2-bf16-lora"]["states"] == got["zero3-bf16-lora"]["states"] == ["float32"]  # as plain LoRA's
    for name, r in got.items():
        assert r["weights"] == ("float32" if "mixed" in name else "bfloat16"), name  # the module's own weights


def test_zero3_train_flops_count_partitioned_parameters(engines):
    """ZeRO-3 leaves each parameter empty (numel 0) between gathers: MFU read 2.7% instead of ~42% on
    2 H200s. The FLOPs of the wrapped model are those of the plain model."""
    from core.model import count_params

    class Partitioned(torch.nn.Module):  # the same check without DeepSpeed: what ZeRO-3 leaves behind
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.empty(0))
            self.w.ds_numel = 12

    assert count_params(Partitioned()) == (12, 12)
    for name in ("zero3-bf16", "zero3-bf16-mixed"):
        r = engines[name]
        assert r["partitioned"] > 0 and r["flops"] == r["flops_plain"] and r["flops"][0] > 0, (name, r)


@pytest.mark.slow
def test_zero_tracks_the_plain_bf16_run_like_fsdp(tmp_path, small_data):
    """Full fine-tune, 4 steps. In pure bf16 the 2-rank runs differ from one process only by the order
    of bf16 sums (grad-accumulation and reduction), which --fsdp measures: ZeRO may differ from the
    plain losses by at most 2x FSDP's largest difference, or 5e-4 (measured: FSDP 3.9e-4, zero2 and
    zero3 3.4e-4; some bf16 weights round the other way). fp32 master weights and states (DeepSpeed's
    plain bf16 mode) keep the sub-ulp updates that bf16 weights drop at this lr: 1.3e-2 off within the
    4 steps."""
    dev = bf16_deviations(tmp_path, small_data, 4, [], {"fsdp": ["--fsdp"], "zero2": ["--deepspeed", "zero2"],
                                                    "zero3": ["--deepspeed", "zero3"]})
    assert dev["fsdp"] < 1e-3, dev  # the yardstick itself is a rounding-order difference
    for name in ("zero2", "zero3"):
        assert dev[name] <= max(2 * dev["fsdp"], 5e-4), dev


@pytest.mark.slow
def test_zero_lora_tracks_the_plain_bf16_run(tmp_path, small_data):
    """LoRA, 6 steps. The plain run trains fp32 adapters; DeepSpeed casts every parameter to bf16, so
    ZeRO's adapter matmuls run in bf16 and its losses differ a little more than FSDP's (measured: FSDP
    2.3e-4, zero2 5.4e-4). bf16 adapter masters and AdamW states, as for full fine-tuning, dropped the
    lr-sized updates of lora_A and learned slower: 3.4e-3 off (0.04 on the 8B shape, 2 H200s)."""
    dev = bf16_deviations(tmp_path, small_data, 6, ["--lora"], {"fsdp": ["--fsdp"], "zero2": ["--deepspeed", "zero2"]})
    assert dev["fsdp"] < 1e-3, dev
    assert dev["zero2"] <= max(4 * dev["fsdp"], 1.5e-3), dev


def _worker(out: str) -> None:
    """Each case: tiny-llama in its precision, nanotune's AdamW, the engine, one step on one batch."""
    sys.path.insert(0, str(ROOT))
    from conftest import three_doc_batch
    from features.deepspeed_zero import DeepSpeedConfig, apply_deepspeed, build_config, step
    from core.distributed import init_distributed
    from features.lora import LoraConfig, apply_lora
    from core.loss import forward_loss_sum
    from core.model import ModelConfig, load_config, load_model, load_tokenizer, train_flops
    from core.optim import OptimConfig, build_optimizer

    torch.set_num_threads(1)
    init_distributed("cpu", need_group=True)
    tok = load_tokenizer(ModelConfig())
    results = {}
    for stage, precision, offload, adapters in CASES:
        cfg = ModelConfig("tiny-llama", precision=precision)
        torch.manual_seed(0)
        model = load_model(cfg, load_config(cfg, tok), torch.device("cpu"))
        if adapters:
            model = apply_lora(model, LoraConfig(lora=True, lora_rank=4))
        flops_plain = train_flops(model)
        optimizer = build_optimizer(model, OptimConfig(lr=1e-4), torch.device("cpu"))
        ds_config = build_config(DeepSpeedConfig(stage, offload), 3, 1, 1.0, precision, dp_size=1, adapters=adapters)
        # tiny-llama's matrices are all under ZeRO-3's default persistence threshold (1e5 elements): kept
        # whole; an 8B's are partitioned, as every parameter is here
        ds_config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
        engine, _ = apply_deepspeed(model, optimizer, ds_config)
        forward_loss_sum(engine, three_doc_batch()).backward()
        step(engine)
        name = f"{stage}-{precision}" + ("-offload" if offload else "") + ("-lora" if adapters else "")
        results[name] = {
            "states": sorted({str(v.dtype).removeprefix("torch.") for s in optimizer.state.values()
                              for k, v in s.items() if k in ("exp_avg", "exp_avg_sq")}),
            "weights": str(next(engine.module.parameters()).dtype).removeprefix("torch."),
            "partitioned": sum(p.numel() == 0 for p in engine.module.parameters()),
            "flops": list(train_flops(engine.module)), "flops_plain": list(flops_plain)}
    Path(out).write_text(json.dumps(results, indent=1))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    _worker(sys.argv[1])
