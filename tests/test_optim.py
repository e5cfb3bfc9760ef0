"""--optimizer adamw-8bit: bitsandbytes' 8-bit AdamW trains, keeps 8-bit moments, and resumes exactly.
--optimizer adamw-sr: torch's AdamW on fp32 weights, unbiased stochastic rounding on bf16 weights, where
plain AdamW's small updates round away. The learning-rate schedules, value by value."""

import json
import math
import shutil

import pytest
import torch

from conftest import read_metrics, run_train
from core.optim import OptimConfig, StochasticRoundingAdamW, build_optimizer, lr_factor, stochastic_round

ARGS = ["--max-steps", "6", "--log-every", "1", "--micro-batch-size", "8", "--lr", "3e-3", "--warmup-steps", "2",
        "--seed", "3", "--optimizer", "adamw-8bit", "--skip-export"]


@pytest.mark.parametrize("schedule, mid, last", [
    ("cosine", 0.55, 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.9))),  # progress 0.5, then 0.9
    ("linear", 0.55, 0.1 + 0.9 * 0.1),
    ("constant", 1.0, 1.0),
])
def test_lr_schedule_warms_up_linearly_then_decays_toward_min_lr_ratio(schedule, mid, last):
    """12 updates, 2 of warm-up: the update at step s runs at lr x lr_factor(s); decay spans steps 2-11
    over 10 steps, so the last update runs at progress 0.9 (the Hugging Face schedulers' convention) and
    lr x min-lr-ratio would be the next one's."""
    cfg = OptimConfig(lr_schedule=schedule, warmup_steps=2, min_lr_ratio=0.1)
    factors = [lr_factor(step, cfg, 12) for step in range(12)]
    assert factors[:3] == [0.5, 1.0, 1.0]
    assert factors[7] == pytest.approx(mid) and factors[11] == pytest.approx(last)
    assert all(a >= b for a, b in zip(factors[1:], factors[2:]))
    assert lr_factor(12, cfg, 12) == pytest.approx(0.1 if schedule != "constant" else 1.0)


def test_8bit_moments_for_matrices():
    model = torch.nn.Sequential(torch.nn.Linear(128, 128), torch.nn.LayerNorm(128))
    opt = build_optimizer(model, OptimConfig(optimizer="adamw-8bit", lr=2e-3), torch.device("cpu"))
    model(torch.randn(4, 128)).square().sum().backward()
    opt.step()
    state = opt.state[model[0].weight]
    assert state["state1"].dtype == torch.uint8 and state["state2"].dtype == torch.uint8
    assert state["state1"].numel() == model[0].weight.numel()  # 1 byte per moment per parameter


def test_trains_and_resumes_exactly(tmp_path, small_data):
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert run_train(full, "--dataset", str(small_data), *ARGS, "--save-every", "3", "--keep-checkpoints", "0") == 0
    (cut / "checkpoints").mkdir(parents=True)
    shutil.copytree(full / "checkpoints" / "step_00000003", cut / "checkpoints" / "step_00000003")
    assert run_train(cut, "--dataset", str(small_data), *ARGS, "--save-every", "3", "--resume", "auto") == 0
    a = {m["step"]: m for m in read_metrics(full) if "loss" in m}
    b = {m["step"]: m for m in read_metrics(cut) if "loss" in m}
    assert a[6]["loss"] < a[1]["loss"]  # it trains
    assert sorted(b) == [4, 5, 6]
    for step in b:  # the 8-bit state (moments, quantization maps, absmax) round-trips through the checkpoint
        assert b[step]["loss"] == a[step]["loss"] and b[step]["grad_norm"] == a[step]["grad_norm"], step


def test_stochastic_rounding_keeps_bf16_values_and_rounds_up_with_the_remainders_probability():
    torch.manual_seed(0)
    exact = torch.tensor([0.0, 1.0, -3.5, 0.015625, 2.0**-130], dtype=torch.bfloat16).float()
    assert torch.equal(stochastic_round(exact, torch.bfloat16).float(), exact)
    step = 2.0**-7  # bf16's step between 1 and 2
    for frac in (0.1, 0.25, 0.75):
        for sign in (1, -1):
            x = torch.full((40_000,), sign * (1 + frac * step))
            r = stochastic_round(x, torch.bfloat16).float()
            assert set(r.unique().tolist()) == {sign * 1.0, sign * (1 + step)}  # only the two neighbours
            assert abs((r.abs() > 1).float().mean().item() - frac) < 0.01  # up with probability frac


def _train_weights(dtype, optimizer, steps=200, lr=2e-5):
    """Weights near 0.02 under a constant gradient: each AdamW update is about lr, under half bf16's step."""
    torch.manual_seed(0)
    w = torch.nn.Parameter((0.02 + 0.002 * torch.rand(4096)).to(dtype))
    start = w.detach().float().clone()
    opt = optimizer([w], lr=lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
    for _ in range(steps):
        w.grad = torch.ones_like(w)
        opt.step()
    return w.detach().float() - start


def test_small_updates_survive_on_bf16_weights_with_stochastic_rounding():
    fp32 = _train_weights(torch.float32, torch.optim.AdamW)  # the fp32-master reference: -200 * lr each
    plain = _train_weights(torch.bfloat16, torch.optim.AdamW)
    rounded = _train_weights(torch.bfloat16, StochasticRoundingAdamW)
    assert abs(fp32.mean().item() + 200 * 2e-5) < 1e-5
    assert plain.abs().max().item() == 0  # every update rounded away
    assert abs(rounded.mean().item() / fp32.mean().item() - 1) < 0.02  # unbiased: the same drift on average


def test_on_fp32_weights_it_is_torch_adamw():
    torch.manual_seed(0)
    a = torch.nn.Linear(64, 32)
    b = torch.nn.Linear(64, 32)
    b.load_state_dict(a.state_dict())
    kwargs = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    ref = torch.optim.AdamW(a.parameters(), **kwargs, foreach=False)
    ours = StochasticRoundingAdamW(b.parameters(), **kwargs)
    for _ in range(5):
        x = torch.randn(8, 64)
        for model, opt in ((a, ref), (b, ours)):
            opt.zero_grad()
            model(x).square().sum().backward()
            opt.step()
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(q, p, rtol=0, atol=1e-7)


def test_loading_a_state_keeps_the_moments_of_bf16_weights_in_fp32():
    """torch's Optimizer.load_state_dict casts each state to its weight's dtype; the moments would drop to bf16."""
    w = torch.nn.Parameter(torch.randn(64, dtype=torch.bfloat16))
    opt = StochasticRoundingAdamW([w], lr=1e-3)
    w.grad = torch.randn_like(w)
    opt.step()
    again = StochasticRoundingAdamW([w], lr=1e-3)
    again.load_state_dict(opt.state_dict())
    for key in ("exp_avg", "exp_avg_sq"):
        assert again.state[w][key].dtype == torch.float32 and torch.equal(again.state[w][key], opt.state[w][key])


def _two_optimizers(device, backend):
    """The same bf16 weights under eager adamw-sr and adamw-sr compiled with `backend`."""
    torch.manual_seed(0)
    weights = [torch.randn(shape, device=device).mul(0.02).bfloat16() for shape in ((96, 64), (64,))]
    pairs = []
    for compile_backend in (None, backend):
        params = [torch.nn.Parameter(w.clone()) for w in weights]
        pairs.append((params, StochasticRoundingAdamW(params, lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1,
                                                      compile_backend=compile_backend)))
    return pairs


def _step_both(pairs, grads, seed):
    for params, opt in pairs:
        for p, g in zip(params, grads):
            p.grad = g.clone().to(p.dtype)
        torch.manual_seed(seed)  # the same random bits for both
        opt.step()


def test_the_update_compiles_to_one_graph_with_the_eager_result():
    """fullgraph=True: no graph break. aot_eager runs the traced (decomposed) ops with the same random bits:
    the same weights, and moments equal to fp32 rounding (lerp decomposes differently)."""
    (a, opt_a), (b, opt_b) = pairs = _two_optimizers("cpu", "aot_eager")
    start = [p.detach().clone() for p in a]
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    for seed in range(3):
        _step_both(pairs, [torch.randn(96, 64), torch.randn(64)], seed)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs + 1  # both tensors, every step
    for p, q, p0 in zip(a, b, start):
        assert not torch.equal(p, p0) and torch.equal(p, q)
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(opt_b.state[q][key], opt_a.state[p][key], rtol=1e-6, atol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_inductors_update_on_cuda_matches_eager_within_the_roundings_spread():
    """Inductor's kernel draws its own random bits: the moments agree to fp32 rounding, the weights stay
    within a bf16 spacing a step of eager's, and the mean drift matches. The gradients lean one way (mean
    0.5), so the drift is the updates' (-0.0087 on CPU), not the rounding's noise: its spread over other
    random bits is 2.6e-6 (96 x 64) and 2.4e-5 (64), far inside 10%. With zero-mean gradients the drift was
    2.2e-5 +- 3.0e-6, so two runs' random bits alone would break the 10% bound in about 45% of pairs."""
    (a, opt_a), (b, opt_b) = pairs = _two_optimizers("cuda", "inductor")
    start = [p.detach().float().clone() for p in a]
    for seed in range(20):
        _step_both(pairs, [torch.randn(96, 64, device="cuda") + 0.5, torch.randn(64, device="cuda") + 0.5], seed)
    for p, q, p0 in zip(a, b, start):
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(opt_b.state[q][key], opt_a.state[p][key], rtol=1e-5, atol=1e-9)
        # each step rounds to a neighbour at most one bf16 spacing away; a weight moves at most ~lr a step
        spacing = torch.finfo(torch.bfloat16).eps * (p0.abs() + 20 * 1e-3)
        assert ((q.float() - p.float()).abs() <= 20 * spacing).all()
        drift_a, drift_b = (p.float() - p0).mean().item(), (q.float() - p0).mean().item()
        assert abs(drift_b - drift_a) < 0.1 * abs(drift_a) + 1e-6


SR = ["--max-steps", "6", "--log-every", "1", "--micro-batch-size", "8", "--lr", "3e-3", "--warmup-steps", "2",
      "--seed", "3", "--optimizer", "adamw-sr", "--skip-export"]


def test_adamw_sr_picks_bf16_weights_trains_and_resumes_exactly(tmp_path, small_data):
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert run_train(full, "--dataset", str(small_data), *SR, "--save-every", "3", "--keep-checkpoints", "0") == 0
    config = json.loads((full / "config.json").read_text())
    assert "--precision bf16 (auto: --optimizer adamw-sr trains bf16 weights)" in config["auto"]
    (cut / "checkpoints").mkdir(parents=True)
    shutil.copytree(full / "checkpoints" / "step_00000003", cut / "checkpoints" / "step_00000003")
    assert run_train(cut, "--dataset", str(small_data), *SR, "--save-every", "3", "--resume", "auto") == 0
    a = {m["step"]: m for m in read_metrics(full) if "loss" in m}
    b = {m["step"]: m for m in read_metrics(cut) if "loss" in m}
    assert a[6]["loss"] < a[1]["loss"]
    for step in b:  # moments and the rounding's random stream both come back from the checkpoint
        assert b[step]["loss"] == a[step]["loss"] and b[step]["grad_norm"] == a[step]["grad_norm"], step


@pytest.mark.parametrize("flags, says", [
    (["--precision", "bf16-mixed"], "--optimizer adamw-sr updates bf16 weights, and --precision bf16-mixed keeps"),
    (["--lora"], "adapters train in fp32"),
])
def test_adamw_sr_is_refused_where_no_weight_is_bf16(tmp_path, small_data, capsys, flags, says):
    assert run_train(tmp_path, "--dataset", str(small_data), *SR, *flags) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and says in err[0], err


NOTICE = "optimizer: adamw on bf16 weights rounds away updates under half a bf16 step"


@pytest.mark.parametrize("flags, noticed", [
    (["--precision", "bf16"], True),
    (["--precision", "bf16", "--optimizer", "adamw-sr"], False),
    (["--precision", "bf16-mixed"], False),
    (["--precision", "bf16", "--lora"], False),
])
def test_adamw_on_bf16_weights_of_a_full_fine_tune_is_noticed(tmp_path, small_data, capsys, flags, noticed):
    assert run_train(tmp_path, "--dataset", str(small_data), "--max-steps", "1", "--skip-export", *flags) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith(NOTICE)]
    assert len(lines) == noticed
    if noticed:
        assert "--optimizer adamw-sr keeps them on average, --precision bf16-mixed keeps fp32 masters" in lines[0]


def test_every_setting_a_resume_compares_is_named_by_a_real_flag():
    """A refused resume names the flag of each changed setting (plan_flag); each is one train.py takes."""
    from conftest import ROOT
    from core.optim import plan_flag, schedule_plan

    flags = {line.split("\t")[0] for line in (ROOT / "tests" / "cli_flags.txt").read_text().splitlines()}
    for key in schedule_plan(OptimConfig(), total_steps=10):
        named = plan_flag(key)
        assert named in flags or named == "the steps (--max-steps / --epochs)", (key, named)
