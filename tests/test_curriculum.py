"""The variable-assignment curriculum: few assignments first, growing with the step to --va_assign."""

from __future__ import annotations

import pytest
import torch

import selective_attention.train as train_mod
from selective_attention.data import VariableAssignment, curriculum_assign
from selective_attention.train import CheckpointError, TrainConfig, main, parse_overrides


def tiny(tmp_path, **kw):
    base = dict(
        data="varassign", va_vars=3, va_assign=6, va_assign_start=2, va_ramp_steps=10, out_dir=str(tmp_path / "run"),
        n_layer=2, n_head=2, d_model=32, context_len=27, batch_size=4, max_steps=14, warmup_steps=2, eval_interval=4,
        eval_batches=2, ckpt_interval=4, selection=True, progress=False,
    )  # fmt: skip
    base.update(kw)
    return TrainConfig.from_options(base)


def reference_schedule(step, final, start, ramp, hold=0):
    """Plain Python, stage by stage: ``start`` for ``hold`` steps, then K = final - start + 1 equal stages over
    ``ramp`` steps."""
    if start == 0:
        return final
    if step < hold:
        return start
    step -= hold
    if step >= ramp:
        return final
    k = final - start + 1
    stage = 0
    while (stage + 1) * ramp <= step * k:  # step is in stage `stage` while stage * ramp <= step * k < (stage+1) * ramp
        stage += 1
    return min(final, start + stage)


@pytest.mark.parametrize("final,start,ramp", [(8, 2, 1500), (6, 2, 10), (24, 1, 7), (5, 5, 3), (3, 1, 100), (9, 0, 0)])
def test_schedule_matches_the_reference_and_grows(final, start, ramp):
    steps = range(ramp + 20)
    got = [curriculum_assign(s, final, start, ramp) for s in steps]
    assert got == [reference_schedule(s, final, start, ramp) for s in steps]
    assert all(b >= a for a, b in zip(got, got[1:])) and got[0] == (start or final) and got[-1] == final
    if start:
        assert all(g == final for g in got[ramp:])
    if start and ramp >= final - start + 1:  # at least a step per stage: one assignment at a time, each visited
        assert all(b - a in (0, 1) for a, b in zip(got, got[1:]))
        assert set(got) == set(range(start, final + 1))


@pytest.mark.parametrize("final,start,ramp,hold", [(8, 2, 3000, 3000), (6, 2, 10, 5), (4, 4, 2, 7), (5, 1, 3, 1)])
def test_schedule_with_a_hold(final, start, ramp, hold):
    got = [curriculum_assign(s, final, start, ramp, hold) for s in range(hold + ramp + 10)]
    assert got == [reference_schedule(s, final, start, ramp, hold) for s in range(hold + ramp + 10)]
    assert got[:hold] == [start] * hold and got[hold:] == [curriculum_assign(s, final, start, ramp) for s in
                                                            range(ramp + 10)]  # fmt: skip
    assert curriculum_assign(5, 8, 0, 0, 3) == 8  # no curriculum: the hold changes nothing


def test_schedule_stages_are_equal_length():
    got = [curriculum_assign(s, final=4, start=2, ramp_steps=6) for s in range(8)]
    assert got == [2, 2, 3, 3, 4, 4, 4, 4]
    counts = [sum(1 for s in range(900) if curriculum_assign(s, 8, 2, 700) == n) for n in range(2, 9)]
    assert counts[:-1] == [100] * 6 and counts[-1] == 100 + 200  # 7 stages of 100 steps, then the final count


@pytest.mark.parametrize(
    "kw,match",
    [(dict(step=-1, final=4), "step must be an int >= 0"), (dict(step=0, final=0), "final must be >= 1"),
     (dict(step=0, final=4, start=5, ramp_steps=3), r"start \(5\) must be at most final \(4\)"),
     (dict(step=0, final=4, start=2), "needs ramp_steps >= 1"), (dict(step=1.5, final=4), "step must be an int"),
     (dict(step=0, final=4, start=2, ramp_steps=2, hold_steps=-1), "hold_steps must be an int >= 0")],
)  # fmt: skip
def test_schedule_bad_values(kw, match):
    with pytest.raises(ValueError, match=match):
        curriculum_assign(**kw)


def test_batch_with_fewer_assignments():
    task = VariableAssignment(n_vars=3, n_assign=6, seed=0)
    for n in (1, 2, 6, 9):  # shorter and longer than the task's own
        x, y, mask = task.batch(8, torch.Generator().manual_seed(n), n_assign=n)
        assert x.shape == y.shape == mask.shape == (8, 4 * n + 3) == (8, VariableAssignment.seq_len_of(n))
        assert (x[mask] == ord("?")).all() and (mask.sum(1) == 1).all()
        for row in range(8):
            text = "".join(map(chr, x[row].tolist())) + chr(y[row, -1].item())
            assert chr(y[row][mask[row]].item()) == VariableAssignment.answer_of(text)
    assert torch.equal(task.batch(4, torch.Generator().manual_seed(1))[0],
                       task.batch(4, torch.Generator().manual_seed(1), n_assign=6)[0])  # fmt: skip
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="n_assign must be a positive int"):
            task.batch(2, n_assign=bad)


def test_batches_at_a_step_have_the_scheduled_length(tmp_path):
    cfg = tiny(tmp_path)
    task = train_mod.Task(cfg)
    gen = torch.Generator().manual_seed(0)
    for step in range(14):
        n = curriculum_assign(step, 6, 2, 10)
        assert task.n_assign_at(step) == n
        x, y = task.batch(gen, step)
        assert x.shape == y.shape == (4, 4 * n + 3)
        assert ((y != -100).sum(1) == 1).all() and (x[:, -2] == ord("?")).all()
    assert task.n_assign_at(None) == 6 and task.batch(gen)[0].shape == (4, 27)  # no step: the final setting
    for x, _, answer in task.eval_batches():  # evaluation is always on the final (hardest) setting
        assert x.shape == (4, 27) and answer.shape == (4, 27)


def test_training_follows_the_schedule_and_logs_it(tmp_path, monkeypatch):
    seen = []
    real = train_mod.Task.batch

    def spy(self, gen, step=None):
        x, y = real(self, gen, step)
        seen.append((step, x.shape[1]))
        return x, y

    monkeypatch.setattr(train_mod.Task, "batch", spy)
    s = main(tiny(tmp_path))
    assert seen == [(step, 4 * curriculum_assign(step, 6, 2, 10) + 3) for step in range(14)]
    assert [row["va_assign"] for row in s["history"]] == [curriculum_assign(st - 1, 6, 2, 10) for st in (4, 8, 12, 14)]
    assert all("val_accuracy" in row for row in s["history"])


@pytest.mark.parametrize("hold", [0, 3])
def test_resume_restores_the_schedule_point(tmp_path, hold):
    ref = main(tiny(tmp_path / "a", va_hold_steps=hold))
    stopped = main(tiny(tmp_path / "b", stop_after=7, va_hold_steps=hold))  # killed mid-curriculum (ckpt: step 4)
    assert stopped["stopped_at"] == 7
    resumed = main(tiny(tmp_path / "b", va_hold_steps=hold))
    assert [r["va_assign"] for r in resumed["history"]] == [curriculum_assign(s - 1, 6, 2, 10, hold) for s in
                                                            (4, 8, 12, 14)]  # fmt: skip

    def strip(h):
        return [{k: v for k, v in row.items() if k != "tokens_per_s"} for row in h]

    assert strip(resumed["history"]) == strip(ref["history"])
    assert resumed["param_checksum"] == ref["param_checksum"]


def test_a_changed_curriculum_is_refused_on_resume(tmp_path):
    main(tiny(tmp_path, max_steps=4))
    with pytest.raises(CheckpointError, match=r"va_ramp_steps: 10 \(checkpoint\) vs 20 \(now\)"):
        main(tiny(tmp_path, max_steps=8, va_ramp_steps=20))


def test_default_is_no_curriculum(tmp_path):
    cfg = TrainConfig()
    assert cfg.va_assign_start == 0 and cfg.va_ramp_steps == 0 and cfg.va_hold_steps == 0
    task = train_mod.Task(tiny(tmp_path, va_assign_start=0, va_ramp_steps=0))
    assert {task.batch(torch.Generator(), step)[0].shape[1] for step in (0, 5, 100)} == {27}
    s = main(tiny(tmp_path, va_assign_start=0, va_ramp_steps=0, max_steps=4))
    assert "va_assign" not in s["history"][-1]


@pytest.mark.parametrize(
    "args,match",
    [(["--data=varassign", "--va_assign=8", "--va_assign_start=9", "--va_ramp_steps=5"],
      r"--va_assign_start=9 is invalid: it must be an int in \[0, --va_assign=8\]"),
     (["--data=varassign", "--va_assign_start=-1"], r"--va_assign_start=-1 is invalid"),
     (["--data=varassign", "--va_assign_start=2"], r"--va_ramp_steps=0 is invalid: it must be an int >= 1 with a"),
     (["--data=varassign", "--va_assign_start=2", "--va_ramp_steps=-3"], r"--va_ramp_steps=-3 is invalid"),
     (["--data=varassign", "--va_ramp_steps=100"], r"--va_ramp_steps=100 needs a curriculum: set --va_assign_start"),
     (["--data=varassign", "--va_hold_steps=100"], r"--va_hold_steps=100 needs a curriculum: set --va_assign_start"),
     (["--data=varassign", "--va_assign_start=2", "--va_ramp_steps=3", "--va_hold_steps=-1"],
      r"--va_hold_steps=-1 is invalid: it must be an int >= 0"),
     (["--data=pydoc", "--va_assign_start=2", "--va_ramp_steps=10"], r"does not apply to --data=pydoc")],
)  # fmt: skip
def test_bad_curriculum_options_are_clear_errors(args, match):
    with pytest.raises(ValueError, match=match):
        parse_overrides(args)


def test_curriculum_options_parse():
    cfg = parse_overrides(["--data=varassign", "--va_assign=8", "--va_assign_start=2", "--va_ramp_steps=1500",
                           "--va_hold_steps=300"])  # fmt: skip
    assert (cfg.va_assign, cfg.va_assign_start, cfg.va_ramp_steps, cfg.va_hold_steps) == (8, 2, 1500, 300)
    assert train_mod.Task(cfg).n_assign_at(299) == 2 and train_mod.Task(cfg).n_assign_at(300 + 1500) == 8
