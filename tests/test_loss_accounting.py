"""The step loss is sum(token losses) / global trained tokens, however the batch is split."""

import torch

import ranks
from conftest import read_metrics, run_train
from core.batches import collate_padded
from core.data import Sample
from core.loss import count_targets, cross_entropy_sum


def _samples(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):  # very different lengths and masks, so a per-micro-batch mean is wrong
        length = 4 + 7 * i
        ids = torch.randint(0, 50, (length,), generator=g).tolist()
        prompt = length // 2
        out.append(Sample(ids, [-100] * prompt + ids[prompt:], prompt))
    return out


def _grads(model, batches, normalize):
    model.zero_grad()
    n_total = sum(count_targets(b["labels"]) for b in batches)
    for b in batches:
        loss = cross_entropy_sum(model(b["input_ids"]), b["labels"])
        (loss / (n_total if normalize == "global" else count_targets(b["labels"]) * len(batches))).backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def test_accumulated_gradient_equals_one_big_batch():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(50, 16), torch.nn.Linear(16, 50)).double()
    samples = _samples()
    big = _grads(model, [collate_padded(samples, 0)], "global")
    accum = _grads(model, [collate_padded(samples[i:i + 2], 0) for i in range(0, 8, 2)], "global")
    torch.testing.assert_close(accum, big, rtol=1e-10, atol=1e-12)
    # the test can fail: averaging per micro-batch (the common bug) gives another gradient
    naive = _grads(model, [collate_padded(samples[i:i + 2], 0) for i in range(0, 8, 2)], "per-micro-batch")
    assert not torch.allclose(naive, big, rtol=1e-3)


def test_train_loop_grad_accum_matches_big_batch(tmp_path, small_data):
    common = ["--dataset", str(small_data), "--max-steps", "3", "--log-every", "1", "--precision", "fp32",
              "--seed", "3"]
    assert run_train(tmp_path / "big", *common, "--micro-batch-size", "8", "--grad-accum", "1") == 0
    assert run_train(tmp_path / "acc", *common, "--micro-batch-size", "2", "--grad-accum", "4") == 0
    big, acc = read_metrics(tmp_path / "big")[1:], read_metrics(tmp_path / "acc")[1:]
    assert [m["step"] for m in big] == [1, 2, 3]
    for a, b in zip(acc, big):
        assert abs(a["loss"] - b["loss"]) < 1e-5 and abs(a["grad_norm"] - b["grad_norm"]) < 1e-4 * b["grad_norm"]
        assert a["tokens"] == b["tokens"]


def test_two_process_data_parallel_matches_one_process(tmp_path, small_data):
    """2 gloo ranks x micro-batch 4 == one process x micro-batch 8."""
    common = ["--dataset", str(small_data), "--max-steps", "3", "--log-every", "1", "--eval-exact-match", "0",
              "--seed", "5", "--device", "cpu"]
    assert run_train(tmp_path / "one", *common, "--micro-batch-size", "8") == 0
    ranks.train(2, *common, "--micro-batch-size", "4", "--output-dir", str(tmp_path / "two"))
    one, two = read_metrics(tmp_path / "one")[1:], read_metrics(tmp_path / "two")[1:]
    for a, b in zip(two, one, strict=True):
        assert abs(a["loss"] - b["loss"]) < 1e-5 and abs(a["grad_norm"] - b["grad_norm"]) < 1e-4 * b["grad_norm"]
        assert a["tokens"] == b["tokens"]
