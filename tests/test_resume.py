"""Checkpoints: a resumed run reproduces the uninterrupted run's per-step losses exactly."""

import json
import shutil

import pytest
import torch

from conftest import read_metrics, run_train
from core.checkpoint import checkpoints

ARGS = ["--max-steps", "8", "--log-every", "1", "--micro-batch-size", "4", "--save-every", "4",
        "--warmup-steps", "3", "--seed", "11", "--eval-every", "4"]


def test_resume_reproduces_uninterrupted_losses(tmp_path, small_data, capsys):
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert run_train(full, "--dataset", str(small_data), *ARGS, "--keep-checkpoints", "0") == 0
    # the interrupted run: the same job whose process died after the step-4 checkpoint, its log beyond it
    (cut / "checkpoints").mkdir(parents=True)
    shutil.copytree(full / "checkpoints" / "step_00000004", cut / "checkpoints" / "step_00000004")
    shutil.copy(full / "metrics.jsonl", cut / "metrics.jsonl")
    capsys.readouterr()
    assert run_train(cut, "--dataset", str(small_data), *ARGS, "--resume", "auto") == 0

    a = {m["step"]: m for m in read_metrics(full)}
    b = {m["step"]: m for m in read_metrics(cut)}
    assert sorted(b) == list(range(9))  # the history up to step 4 kept, steps 5-8 written again
    # the closing line reads the evaluation before training from the kept history
    assert f"validation loss {a[0]['val_loss']:.4f} -> {b[8]['val_loss']:.4f}" in capsys.readouterr().out
    for step in range(5, 9):  # bit-exact on CPU: same data position, RNG, optimizer and schedule state
        assert b[step]["loss"] == a[step]["loss"], step
        assert b[step]["lr"] == a[step]["lr"] and b[step]["grad_norm"] == a[step]["grad_norm"]
        assert b[step]["tokens"] == a[step]["tokens"]
    assert b[8]["val_loss"] == a[8]["val_loss"]
    from safetensors.torch import load_file  # the final weights agree too
    fa, fb = load_file(full / "final" / "model.safetensors"), load_file(cut / "final" / "model.safetensors")
    assert all(torch.equal(fa[k], fb[k]) for k in fa)


def test_a_resume_that_changes_the_schedule_or_the_optimizer_is_refused(tmp_path, small_data, capsys, monkeypatch):
    """Refused before the model loads (minutes for an 8B one)."""
    import train

    out = tmp_path / "run"
    common = ["--dataset", str(small_data), "--micro-batch-size", "4", "--save-every", "2", "--warmup-steps", "1"]
    assert run_train(out, *common, "--max-steps", "3") == 0  # a checkpoint at step 2 of 3
    shutil.rmtree(out / "final")
    capsys.readouterr()
    with monkeypatch.context() as m:
        m.setattr(train, "build_model", lambda *a: pytest.fail("the model loaded before the refusal"))
        assert run_train(out, *common, "--max-steps", "6", "--weight-decay", "0.1", "--resume", "auto") == 2
    err = capsys.readouterr().err
    assert "this run changes the steps (--max-steps / --epochs) 6 (saved: 3); --weight-decay 0.1 (saved: 0.0)" in err
    assert "resume with the saved values, or start anew in another --output-dir" in err
    assert run_train(out, *common, "--max-steps", "3", "--resume", "auto") == 0  # the saved values: it resumes
    shutil.rmtree(out / "final")
    assert run_train(out, *common, "--max-steps", "3", "--lr", "1", "--resume", "auto") == 0  # nothing left to train
    assert (out / "final").is_dir()


def test_checkpoint_layout_and_retention(tmp_path, small_data):
    out = tmp_path / "run"
    assert run_train(out, "--dataset", str(small_data), "--max-steps", "6", "--save-every", "2",
                     "--keep-checkpoints", "2", "--micro-batch-size", "4") == 0
    assert [s for s, _ in checkpoints(out)] == [4, 6]
    state = json.loads((out / "checkpoints" / "step_00000006" / "trainer_state.json").read_text())
    assert state["step"] == 6 and state["data"] == {"epoch": 0, "step_in_epoch": 6, "rows_per_step": 4}
    assert not list((out / "checkpoints").glob(".tmp-*"))


def test_incomplete_checkpoint_is_ignored_by_auto_resume(tmp_path, small_data):
    out = tmp_path / "run"
    assert run_train(out, "--dataset", str(small_data), "--max-steps", "2", "--save-every", "2",
                     "--micro-batch-size", "4") == 0
    shutil.copytree(out / "checkpoints" / "step_00000002", out / "checkpoints" / ".tmp-step_00000004")
    partial = out / "checkpoints" / "step_00000003"
    partial.mkdir()  # a directory without trainer_state.json: a save that never finished
    assert [s for s, _ in checkpoints(out)] == [2]


def test_existing_checkpoints_need_resume(tmp_path, small_data, capsys):
    out = tmp_path / "run"
    common = ["--dataset", str(small_data), "--max-steps", "2", "--save-every", "2", "--micro-batch-size", "4"]
    assert run_train(out, *common) == 0
    assert run_train(out, *common) == 2
    assert "--resume auto" in capsys.readouterr().err
    assert run_train(out, *common, "--resume", "auto") == 0  # already finished: nothing to redo


def test_an_earlier_runs_directory_is_refused_unless_it_can_be_continued(tmp_path, small_data, capsys):
    out = tmp_path / "run"
    common = ["--dataset", str(small_data), "--max-steps", "2", "--micro-batch-size", "4"]
    assert run_train(out, *common) == 0  # finished, no checkpoint kept
    capsys.readouterr()
    assert run_train(out, *common) == 2
    assert "holds an earlier run's results; choose another --output-dir" in capsys.readouterr().err
    assert run_train(out, *common, "--resume", "auto") == 2
    assert "holds a finished run (final/) and no checkpoint to continue from" in capsys.readouterr().err
    shutil.rmtree(out / "final")  # a run that died before its first checkpoint: a requeue starts it again
    assert run_train(out, *common, "--resume", "auto") == 0
    assert f"no checkpoint in {out} yet; starting from step 0" in capsys.readouterr().out
    assert [m["step"] for m in read_metrics(out)] == [0, 1, 2]  # one history, not two runs' mixed


def test_final_model_loads_with_transformers(tmp_path, small_data):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "run"
    assert run_train(out, "--dataset", str(small_data), "--max-steps", "2", "--micro-batch-size", "4") == 0
    model = AutoModelForCausalLM.from_pretrained(out / "final")
    assert model.config.use_cache  # as the base had it: training's use_cache=False is not saved
    tok = AutoTokenizer.from_pretrained(out / "final")
    ids = tok("### Instruction:\nCopy.", return_tensors="pt").input_ids
    assert torch.isfinite(model(ids).logits).all()


@pytest.mark.parametrize("changed, said", [
    (["--lora", "--lora-rank", "8"], "of another shape (first: base_model.model.model.layers.0.mlp.down_proj.lora_A"),
    (["--lora", "--lora-targets", "q_proj,v_proj"], "40 saved that this run does not train"),
    ([], "trained here that it did not save (first: lm_head.weight)"),  # the adapter resumed as a full fine-tune
])
def test_a_resume_into_other_weights_is_refused(tmp_path, small_data, capsys, changed, said):
    """Another --lora-rank or model: one line, not DCP's traceback; fewer --lora-targets: refused, not
    a silent load of part of the adapter."""
    out = tmp_path / "run"
    common = ["--dataset", str(small_data), "--micro-batch-size", "4", "--max-steps", "3", "--skip-export"]
    assert run_train(out, *common, "--lora", "--save-every", "2") == 0  # checkpoints at steps 2 and 3
    capsys.readouterr()
    assert run_train(out, *common, *changed, "--resume", str(out / "checkpoints" / "step_00000002")) == 2
    err = capsys.readouterr().err
    assert said in err and "Resume with the --model and adapter flags" in err and "Traceback" not in err


def test_a_checkpoint_resumes_only_in_the_format_that_saved_it(tmp_path):
    """A DeepSpeed checkpoint (its engine's files in deepspeed/) without --deepspeed, or a DCP one with it,
    is refused in one line before the model loads (else DCP's or DeepSpeed's own assertion, from deep inside)."""
    from core import UserError
    from core.checkpoint import ENGINE_TAG, check_resume
    from core.distributed import Dist

    class Batches:
        def load_state_dict(self, state):
            self.state = state

    step = tmp_path / "step_00000002"
    step.mkdir()
    (step / "trainer_state.json").write_text(json.dumps(
        {"step": 2, "scheduler": {"plan": {}}, "data": {"epoch": 0}, "world_size": 1}))
    with pytest.raises(UserError, match="saved without --deepspeed, it resumes only so; drop --deepspeed"):
        check_resume(step, {}, Batches(), Dist(), deepspeed=True)
    assert check_resume(step, {}, Batches(), Dist(), deepspeed=False)["step"] == 2
    (step / ENGINE_TAG).mkdir()
    with pytest.raises(UserError, match="saved with --deepspeed, it resumes only so; pass the same --deepspeed"):
        check_resume(step, {}, Batches(), Dist(), deepspeed=False)
    assert check_resume(step, {}, Batches(), Dist(), deepspeed=True)["step"] == 2


def test_a_finished_run_resumes_to_write_final_with_its_own_optimizer_only(tmp_path):
    """At its last step a resume trains nothing, so a changed --lr passes; the optimizer's state still
    loads, so another --optimizer is refused in one line (its state would not fit: a traceback)."""
    from core import UserError
    from core.checkpoint import check_resume
    from core.distributed import Dist

    class Batches:
        def load_state_dict(self, state):
            pass

    step = tmp_path / "step_00000004"
    step.mkdir()
    plan = {"total_steps": 4, "optimizer": "adamw", "lr": 3e-4}
    (step / "trainer_state.json").write_text(json.dumps(
        {"step": 4, "scheduler": {"plan": plan}, "data": {}, "world_size": 1}))
    assert check_resume(step, {**plan, "lr": 1e-3}, Batches(), Dist(), deepspeed=False)["step"] == 4
    with pytest.raises(UserError, match=r"changes --optimizer adamw-sr \(saved: adamw\)"):
        check_resume(step, {**plan, "optimizer": "adamw-sr"}, Batches(), Dist(), deepspeed=False)
    with pytest.raises(UserError, match=r"; --lr 0.001 \(saved: 0.0003\)"):  # with steps left, any change
        check_resume(step, {**plan, "total_steps": 8, "lr": 1e-3}, Batches(), Dist(), deepspeed=False)
