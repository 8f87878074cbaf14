"""The training loop: learning, exact resume, atomic checkpoints (and older formats), config overrides."""

import dataclasses
import json
import os
import warnings

import pytest
import torch

from selective_attention import checkpoint
from selective_attention import train as train_mod
from selective_attention.train import (
    CheckpointError,
    TrainConfig,
    load_checkpoint,
    lr_at,
    main,
    model_from_checkpoint,
    parse_overrides,
)


def tiny(tmp_path, **kw):
    base = dict(
        data="pydoc", out_dir=str(tmp_path / "run"), n_layer=2, n_head=2, d_model=32, context_len=32,
        batch_size=4, max_steps=12, warmup_steps=2, eval_interval=4, eval_batches=2, ckpt_interval=4,
        selection=True, progress=False,
    )  # fmt: skip
    base.update(kw)
    return TrainConfig.from_options(base)


def test_loss_is_finite_and_falls(tmp_path):
    summary = main(tiny(tmp_path, max_steps=30, eval_interval=10, lr=5e-3))
    losses = [h["val_loss"] for h in summary["history"]]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0] - 0.3
    lines = (tmp_path / "run" / "log.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [10, 20, 30]


def test_resume_equals_uninterrupted(tmp_path):
    ref = main(tiny(tmp_path / "a"))
    stopped = main(tiny(tmp_path / "b", stop_after=6))  # "killed" after 6 steps (last checkpoint: step 4)
    assert stopped["stopped_at"] == 6
    resumed = main(tiny(tmp_path / "b"))
    assert (ref["start_step"], resumed["start_step"]) == (0, 4)  # tokens_per_s of a resumed run: its steps only

    def strip(h):  # everything but the wall-clock throughput
        return [{k: v for k, v in row.items() if k != "tokens_per_s"} for row in h]

    assert strip(resumed["history"]) == strip(ref["history"])
    ta, ma = load_checkpoint(tmp_path / "a" / "run")
    tb, mb = load_checkpoint(tmp_path / "b" / "run")
    assert ma["step"] == mb["step"] == 12
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k


def test_compiled_training_matches_eager_and_resumes_either_way(tmp_path):
    """--compile: the same run as eager up to inductor's reordered sums (selective layers with the memory loss,
    through the chunked custom ops), and a compiled run resumes without it (or with: the option is free on resume)."""
    kw = dict(max_steps=8, memory_eps=0.1)
    ref = main(tiny(tmp_path / "a", **kw))
    comp = main(tiny(tmp_path / "b", compile=True, stop_after=4, **kw))
    assert comp["stopped_at"] == 4
    comp = main(tiny(tmp_path / "b", **kw))  # resumed without --compile
    for a, b in zip(ref["history"], comp["history"], strict=True):
        assert a["step"] == b["step"]
        for key in ("loss", "ce", "memory", "val_loss"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-5), (a["step"], key)
    assert all(row["tokens_per_s"] > 0 for row in comp["history"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run by benchmarks/gpu_check.sh)")
def test_resume_on_a_gpu_with_dropout_equals_uninterrupted(tmp_path):
    """Dropout on a GPU draws from the device's generator: its state is in the checkpoint too."""
    kw = dict(device="cuda", dropout=0.1)
    ref = main(tiny(tmp_path / "a", **kw))
    main(tiny(tmp_path / "b", stop_after=6, **kw))
    resumed = main(tiny(tmp_path / "b", **kw))
    assert resumed["param_checksum"] == ref["param_checksum"]
    assert "rng.cuda" in load_checkpoint(tmp_path / "b" / "run")[0]


def test_atomic_save_survives_a_crash(tmp_path, monkeypatch):
    cfg = tiny(tmp_path, max_steps=4)
    main(cfg)
    path = tmp_path / "run" / "ckpt.safetensors"
    before = path.read_bytes()

    import safetensors.torch

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial garbage")  # a half-written temp file
        raise KeyboardInterrupt("killed mid-save")

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        main(tiny(tmp_path, max_steps=8))
    assert path.read_bytes() == before  # the previous checkpoint is intact
    model, meta = model_from_checkpoint(path)
    assert meta["step"] == 4


def test_save_makes_the_file_and_its_rename_durable(tmp_path, monkeypatch):
    """fsync of the temp file before the rename and of the folder after it (else a power loss may bring the old
    checkpoint back while log.jsonl is ahead of it)."""
    import os
    import stat

    synced = []
    real = os.fsync

    def spy(fd):
        synced.append("dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        return real(fd)

    monkeypatch.setattr(train_mod.os, "fsync", spy)
    main(tiny(tmp_path, max_steps=4))
    assert synced == ["file", "dir"]


def test_corrupt_and_mismatched_checkpoints_are_clear_errors(tmp_path):
    main(tiny(tmp_path, max_steps=4))
    path = tmp_path / "run" / "ckpt.safetensors"
    with pytest.raises(CheckpointError, match="was made for another model.*d_model"):
        main(tiny(tmp_path, max_steps=8, d_model=64))
    path.write_bytes(path.read_bytes()[:100])  # truncated
    with pytest.raises(CheckpointError, match="corrupt"):
        main(tiny(tmp_path, max_steps=8))
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_checkpoint(tmp_path / "nowhere")


def test_resume_takes_a_new_dropout_or_memory_loss_as_a_config_change(tmp_path):
    """dropout, memory_eps and memory_tau set how the model trains, not its weights: a resume with other values was
    refused as "made for another model", even with --allow_config_change. Now they are a training-config change:
    refused without the flag (naming the field), taken with it."""
    main(tiny(tmp_path, max_steps=4))
    for change in (dict(dropout=0.1), dict(memory_eps=0.1), dict(memory_eps=0.1, memory_tau=0.5)):
        with pytest.raises(CheckpointError, match=f"trained with another config: .*{next(iter(change))}: "):
            main(tiny(tmp_path, max_steps=8, **change))
    out = main(tiny(tmp_path, max_steps=8, dropout=0.1, allow_config_change=True))
    assert out["start_step"] == 4 and out["steps"] == 8
    stored = load_checkpoint(tmp_path / "run" / "ckpt.safetensors")[1]["model_config"]
    assert stored["dropout"] == 0.1  # the checkpoint now records the value it trained with


def test_resume_refuses_a_checkpoint_link_whose_target_is_gone(tmp_path):
    """A checkpoint symlinked to storage that was moved or unmounted: resume took "no file" for "no run", started over
    from step 0, rewrote the log and replaced the link. It is refused, naming the target; eval likewise."""
    main(tiny(tmp_path, max_steps=4))
    run = tmp_path / "run"
    stored = tmp_path / "store.safetensors"
    (run / checkpoint.CKPT_NAME).rename(stored)
    (run / checkpoint.CKPT_NAME).symlink_to(stored)
    assert load_checkpoint(run)[1]["step"] == 4  # a live link loads
    stored.rename(tmp_path / "moved")
    log = (run / "log.jsonl").read_text()
    for load in (lambda: main(tiny(tmp_path, max_steps=6)), lambda: load_checkpoint(run)):
        with pytest.raises(CheckpointError, match=rf"is a link to {stored}, which does not exist"):
            load()
    assert (run / checkpoint.CKPT_NAME).is_symlink() and (run / "log.jsonl").read_text() == log


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes are POSIX")
def test_a_checkpoint_path_that_is_a_named_pipe_is_refused_not_waited_on(tmp_path):
    """A FIFO where the checkpoint should be: opening it blocks until something writes, so eval and resume hung with
    no message. Both are refused at once, naming what the path is. (The test holds the pipe open itself, so that code
    which opens it fails this test instead of hanging it.)"""
    run = tmp_path / "run"
    run.mkdir()
    os.mkfifo(run / checkpoint.CKPT_NAME)
    held = os.open(run / checkpoint.CKPT_NAME, os.O_RDWR | os.O_NONBLOCK)
    try:
        for target in (run, run / checkpoint.CKPT_NAME):
            with pytest.raises(CheckpointError, match=r"is a named pipe \(FIFO\), not a regular file"):
                load_checkpoint(target)
        with pytest.raises(CheckpointError, match="named pipe"):
            main(tiny(tmp_path, max_steps=4))  # resume
    finally:
        os.close(held)


def test_resume_takes_default_head_sizes_given_explicitly_as_the_same_model(tmp_path):
    """A run trained with the default d_head and n_kv_head resumes with them given explicitly (d_model // n_head, and
    n_head): the same model, which was refused as "made for another model" ({'d_head': (None, 16)})."""
    main(tiny(tmp_path, max_steps=4))
    assert main(tiny(tmp_path, max_steps=6, d_head=16, n_kv_head=2))["start_step"] == 4
    with pytest.raises(CheckpointError, match="d_head"):
        main(tiny(tmp_path, max_steps=8, d_head=8))


def test_resume_false_starts_over(tmp_path):
    main(tiny(tmp_path, max_steps=4))
    s = main(tiny(tmp_path, max_steps=4, resume=False, d_model=64))
    assert s["history"][-1]["step"] == 4


def test_resume_false_sets_the_old_checkpoint_aside_before_training(tmp_path):
    """A --resume=false run killed before its first save must not leave the old run's checkpoint for the next
    resume (which would continue the old run under the new run's emptied log): it is moved aside at the start."""
    main(tiny(tmp_path, max_steps=6, ckpt_interval=6))
    run = tmp_path / "run"
    main(tiny(tmp_path, max_steps=8, ckpt_interval=8, resume=False, stop_after=2))  # killed before a save
    assert not (run / checkpoint.CKPT_NAME).exists()
    assert load_checkpoint(run / checkpoint.PREVIOUS_CKPT_NAME)[1]["step"] == 6  # kept, aside
    s = main(tiny(tmp_path, max_steps=4))  # the next plain run starts afresh, not from step 6
    assert [h["step"] for h in s["history"]] == [4]


def test_a_second_resume_false_says_it_replaces_the_checkpoint_set_aside(tmp_path, capsys):
    main(tiny(tmp_path, max_steps=2))
    main(tiny(tmp_path, max_steps=3, resume=False))
    assert "replacing" not in capsys.readouterr().err  # the first: nothing was set aside before
    main(tiny(tmp_path, max_steps=4, resume=False))
    assert "replacing the one an earlier --resume=false set aside there" in capsys.readouterr().err
    assert load_checkpoint(tmp_path / "run" / checkpoint.PREVIOUS_CKPT_NAME)[1]["step"] == 3


def test_a_split_too_small_for_one_window_fails_before_training(tmp_path):
    corpus = tmp_path / "small.txt"
    corpus.write_text("In the beginning was the word. " * 40)
    with pytest.raises(ValueError, match=r"the val split.*has \d+ tokens.*needs"):
        # evaluating late and saving early: before this check, a checkpoint was written before the error
        kw = dict(val_fraction=0.01, tokenizer="byte", context_len=64, eval_interval=12, ckpt_interval=2)
        main(tiny(tmp_path, data=str(corpus), **kw))
    assert not (tmp_path / "run" / checkpoint.CKPT_NAME).exists()


def test_min_lr_above_lr_is_refused_for_a_new_run_and_the_divergence_advice_keeps_them_ordered(tmp_path):
    with pytest.raises(ValueError, match=r"--min_lr=0.0003 is above --lr=0.0001.*--min_lr=1e-05"):
        main(tiny(tmp_path, lr=1e-4))
    assert not (tmp_path / "run" / checkpoint.CKPT_NAME).exists()
    # a stored config with lr < min_lr (written before the rule) still loads and resumes
    main(tiny(tmp_path, lr=1e-4, min_lr=1e-5, max_steps=2, eval_interval=2, ckpt_interval=2))
    _rewrite_metadata(tmp_path / "run" / checkpoint.CKPT_NAME, train_config=json.dumps(
        {**load_checkpoint(tmp_path / "run")[1]["train_config"], "min_lr": 3e-4}))  # fmt: skip
    cfg = tiny(tmp_path, lr=1e-4, max_steps=4, eval_interval=2, ckpt_interval=2)
    assert [h["step"] for h in main(cfg)["history"]] == [2, 4]
    cfg = parse_overrides(["--lr=1e-3"])
    msg = str(train_mod._diverged(3, float("nan"), 1e9, cfg, None, "non-finite loss"))
    advice = msg.split("e.g. ")[1].split(",")[0].split()
    lr, min_lr = (float(a.split("=")[1]) for a in advice)  # what it advises is itself accepted
    assert advice[0] == "--lr=0.0001" and min_lr <= lr
    parse_overrides(advice)


def test_varassign_task_trains_and_reports_accuracy(tmp_path):
    s = main(tiny(tmp_path, data="varassign", context_len=128, max_steps=4, eval_interval=4))
    assert 0.0 <= s["val_accuracy"] <= 1.0


def test_memory_loss_is_logged(tmp_path):
    s = main(tiny(tmp_path, max_steps=4, memory_eps=0.1, eval_interval=4))
    assert "memory" in s["history"][-1] and s["history"][-1]["memory"] > 0


def test_lr_schedule():
    cfg = TrainConfig(lr=1.0, min_lr=0.1, warmup_steps=10, max_steps=110)
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(60, cfg) == pytest.approx(0.55)
    assert lr_at(110, cfg) == pytest.approx(0.1)


def test_parse_overrides():
    cfg = parse_overrides(["--lr=1e-3", "--selection=true", "--n_layer=3", "--data=pydoc", "--selection-layers=0,2"])
    assert (cfg.lr, cfg.model.selection, cfg.model.n_layer, cfg.data) == (1e-3, True, 3, "pydoc")
    assert cfg.model.selection_layers == (0, 2)
    with pytest.raises(ValueError, match="unknown option --lrr"):
        parse_overrides(["--lrr=1"])
    with pytest.raises(ValueError, match="expects int"):
        parse_overrides(["--n_layer=two"])
    with pytest.raises(ValueError, match="true/false"):
        parse_overrides(["--selection=maybe"])
    with pytest.raises(ValueError, match="--key=value"):
        parse_overrides(["lr"])
    with pytest.raises(ValueError, match=r"lists '0,0' with a value twice"):  # a typo for 0,1 passed as (0,)
        parse_overrides(["--selection_layers=0,0"])


def test_option_values_that_look_like_options_are_kept():
    """Only option names are rewritten (dashes to underscores): a value is passed on as given."""
    from selective_attention.options import normalise_argv

    argv = ["--prompt", "-- a well-known text", "--out-dir=a-b", "--x=--y-z", "--", "--no-progress"]
    assert normalise_argv(argv) == ["--prompt", "-- a well-known text", "--out_dir=a-b", "--x=--y-z", "--no_progress"]
    # a value shaped like an option: with the known names, only those are rewritten (it was "--well_known=yes")
    argv = ["--prompt", "--well-known=yes", "--max-new-tokens", "2"]
    known = {"--prompt", "--max_new_tokens"}
    assert normalise_argv(argv, known) == ["--prompt", "--well-known=yes", "--max_new_tokens", "2"]


def test_checkpoint_holds_optimizer_and_rng(tmp_path):
    main(tiny(tmp_path, max_steps=4))
    tensors, meta = load_checkpoint(tmp_path / "run")
    assert any(k.startswith("optim.") and k.endswith("exp_avg") for k in tensors)
    assert "rng.torch" in tensors and "rng.data" in tensors
    assert meta["train_config"]["max_steps"] == 4 and checkpoint.FORMAT_VERSION == meta["format_version"]


def _torchrun(out_dir, *extra, nproc=2):
    """``selective-attention train`` under torchrun with ``nproc`` CPU processes (gloo) -> each rank's summary."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "selective_attention", "train",
           "--data=pydoc", f"--out_dir={out_dir}", "--n_layer=1", "--n_head=2", "--d_model=32",
           "--context_len=32", "--batch_size=4", "--max_steps=4", "--eval_interval=4", "--eval_batches=1",
           "--progress=false", "--selection=true", *extra]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    # the ranks' own errors come before torchrun's summary of them: show those lines, not just the tail
    errors = [ln for ln in r.stderr.splitlines() if any(w in ln for w in ("Error", "terminate", "what()", "exitcode"))]
    assert r.returncode == 0, "\n".join(errors[:40]) + "\n...\n" + r.stderr[-1500:]
    return sorted((json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")), key=lambda s: s["rank"])


def test_ddp_two_processes_keep_replicas_in_sync(tmp_path):
    """torchrun with 2 CPU processes (gloo): each rank sees other data, yet the replicas stay equal,
    so the gradients were averaged."""
    summaries = _torchrun(tmp_path / "ddp")
    assert [s["rank"] for s in summaries] == [0, 1]
    assert summaries[0]["param_checksum"] == summaries[1]["param_checksum"]
    assert (tmp_path / "ddp" / "ckpt.safetensors").exists()


def test_ddp_logs_the_steps_loss_over_every_rank(tmp_path):
    """Each rank's loss is its own batch's: the logged loss is their mean, as the gradients are averaged (it was rank
    0's alone). Each rank's loss is written to a file of its own by a wrapper of GPT.forward in the launched script
    (printed, the two ranks' lines interleaved on the shared pipe)."""
    import subprocess
    import sys

    script = tmp_path / "launch.py"
    script.write_text(
        "import json, os, sys\n"
        "import selective_attention.model as m\n"
        "forward = m.GPT.forward\n"
        "def traced(self, idx, targets=None):\n"
        "    out = forward(self, idx, targets)\n"
        "    if targets is not None and self.training:\n"
        f"        with open(os.path.join({str(tmp_path)!r}, 'loss' + os.environ['RANK']), 'a') as f:\n"
        "            f.write(json.dumps(float(out[0])) + '\\n')\n"
        "    return out\n"
        "m.GPT.forward = traced\n"
        "from selective_attention.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script), "train",
           "--data=pydoc", f"--out_dir={tmp_path / 'run'}", "--n_layer=1", "--n_head=2", "--d_model=32",
           "--context_len=32", "--batch_size=4", "--max_steps=1", "--eval_batches=1", "--progress=false",
           "--selection=true"]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-1500:]
    local = {rank: json.loads((tmp_path / f"loss{rank}").read_text().splitlines()[0]) for rank in (0, 1)}
    logged = json.loads((tmp_path / "run" / "log.jsonl").read_text().splitlines()[-1])["loss"]
    assert len(local) == 2 and abs(local[0] - local[1]) > 1e-3  # two batches, two losses
    assert logged == pytest.approx((local[0] + local[1]) / 2, abs=1e-5)  # logged with 5 decimals


def test_ddp_resume_continues_each_ranks_data(tmp_path):
    """A 2-process run killed after its step-2 checkpoint and resumed ends where an uninterrupted one does: each
    rank's data stream is stored (not rank 0's for all). Another number of processes is refused."""
    ref = _torchrun(tmp_path / "a", "--ckpt_interval=2", "--eval_interval=2")
    _torchrun(tmp_path / "b", "--ckpt_interval=2", "--eval_interval=2", "--stop_after=3")
    tensors, meta = load_checkpoint(tmp_path / "b")
    assert meta["step"] == 2 and meta["extra"]["world_size"] == 2
    assert not torch.equal(tensors["rng.data"], tensors["rng.data.1"])
    resumed = _torchrun(tmp_path / "b", "--ckpt_interval=2", "--eval_interval=2")  # its checkpoint logged step 2's eval
    assert [s["param_checksum"] for s in resumed] == [s["param_checksum"] for s in ref]
    assert resumed[0]["val_loss"] == ref[0]["val_loss"]
    # rank 1 evaluates nothing: no val_loss or history, resumed or not (it reported the checkpoint's last evaluation)
    assert resumed[1]["val_loss"] is None and ref[1]["val_loss"] is None
    cfg = TrainConfig.from_options(
        dict(
            data="pydoc",
            out_dir=str(tmp_path / "b"),
            n_layer=1,
            n_head=2,
            d_model=32,
            context_len=32,
            batch_size=4,
            max_steps=4,
            eval_interval=4,
            eval_batches=1,
            progress=False,
            selection=True,
            ckpt_interval=2,
        )
    )  # fmt: skip  (the runs' options, in one process)
    with pytest.raises(CheckpointError, match=r"run of 2 training process\(es\); this one has 1.*nproc_per_node=2"):
        main(cfg)


def test_varassign_targets_only_the_answer(tmp_path):
    task = train_mod.Task(tiny(tmp_path, data="varassign", va_vars=3, va_assign=5, context_len=64))
    x, y = task.batch(torch.Generator().manual_seed(0))
    assert ((y != -100).sum(dim=1) == 1).all()  # one target per example: the answer digit
    answers = y[y != -100]
    assert ((answers >= ord("0")) & (answers <= ord("9"))).all()
    assert (x[:, -2] == ord("?")).all() and (y[:, -2] != -100).all()  # the answer follows the "?"


# --- hardening: divergence, checksums, resume checks, out_dir, validation, log, progress -------------
def test_divergence_stops_before_a_bad_checkpoint(tmp_path):
    with pytest.raises(train_mod.TrainingDiverged, match=r"at step (\d+): loss .*lower --lr") as info:
        main(tiny(tmp_path, lr=1e9, ckpt_interval=1))  # lr 1e9: the weights blow up within two steps
    bad_step = int(info.value.step)
    tensors, meta = load_checkpoint(tmp_path / "run")
    assert meta["step"] == bad_step - 1  # every good step was saved, the diverged one was not
    assert all(torch.isfinite(t.float()).all() for k, t in tensors.items() if not k.startswith("rng."))
    assert isinstance(info.value, ValueError)  # so the CLI prints one line and exits 2


def test_divergence_right_after_a_save_says_that_checkpoint_fails_again(tmp_path):
    """A step that fails from the weights just saved (their forward overflowed: finite, but ~1e11) was told to resume
    that checkpoint with a lower --lr: a resume runs the same batch through the same weights, so it failed again at
    the same step, every time. Now the message says so; a checkpoint an earlier step wrote keeps the advice."""
    cfg = tiny(tmp_path)
    right_after = str(train_mod._diverged(3, float("nan"), 1e9, cfg, 2, "lr 1 at that step"))
    assert "holds the weights whose step 3 failed" in right_after and "--resume=false" in right_after
    assert "continue it" not in right_after
    earlier = str(train_mod._diverged(5, float("nan"), 1e9, cfg, 2, "lr 1 at that step"))
    assert "(step 2) in" in earlier and "is untouched: continue it" in earlier
    update = str(train_mod._diverged(3, 1.0, 1.0, cfg, 2, "the update made weights inf/NaN", update=True))
    assert "is untouched: continue it" in update  # that step's update was never saved


def test_an_unwritable_log_or_lock_is_one_error_line(tmp_path, monkeypatch):
    """A full disk while appending to log.jsonl, or writing the run's lock, ended in an OSError traceback (the
    checkpoint write already gave one line)."""
    (tmp_path / "log.jsonl").mkdir()  # a write there fails as a full disk's would: an OSError
    for write in (lambda: train_mod._log(tmp_path, {"step": 1}), lambda: train_mod._write_log(tmp_path, [])):
        with pytest.raises(ValueError, match=r"could not write .*log.jsonl .*and resume"):
            write()
    real = train_mod.Path.write_text

    def full(self, *args, **kwargs):
        real(self, "")  # what a full disk leaves: an empty file
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(train_mod.Path, "write_text", full)
    with pytest.raises(ValueError, match=r"could not write .*\.train\.lock.*No space left"):
        with train_mod._run_lock(tmp_path):
            pass
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(train_mod.LOCK_NAME)]  # no stray lock file


def test_checkpoints_get_the_umask_s_permissions_and_no_temporary_survives_ctrl_c(tmp_path, monkeypatch):
    """safetensors writes 0600 whatever the umask (the log beside it got 0644); a Ctrl-C during the write left a
    checkpoint-sized ckpt.safetensors.tmp behind."""
    import safetensors.torch

    old = os.umask(0o022)  # (under 077 safetensors' 0600 would be the umask's too: nothing to tell apart)
    try:
        main(tiny(tmp_path, max_steps=2, ckpt_interval=2, eval_interval=2))
    finally:
        os.umask(old)
    path = tmp_path / "run" / "ckpt.safetensors"
    assert path.stat().st_mode & 0o777 == 0o644 == (tmp_path / "run" / "log.jsonl").stat().st_mode & 0o777
    # a file system that refuses chmod: the checkpoint is still written (0600), no error
    monkeypatch.setattr(checkpoint.os, "chmod", lambda *a: (_ for _ in ()).throw(PermissionError(1, "refused")))
    main(tiny(tmp_path, max_steps=4, ckpt_interval=2, eval_interval=2))
    assert load_checkpoint(path)[1]["step"] == 4
    monkeypatch.undo()
    real = safetensors.torch.save_file

    def interrupted(tensors, name, metadata=None):
        real(tensors, name, metadata=metadata)
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        main(tiny(tmp_path, max_steps=6, ckpt_interval=2, eval_interval=2))
    assert sorted(p.name for p in (tmp_path / "run").iterdir() if "ckpt" in p.name) == ["ckpt.safetensors"]


def test_ctrl_c_says_which_step_is_saved_and_how_to_go_on(tmp_path, monkeypatch, capsys):
    batch = train_mod.Task.batch

    def interrupted(self, gen, step=0):
        if step == 3:
            raise KeyboardInterrupt
        return batch(self, gen, step)

    monkeypatch.setattr(train_mod.Task, "batch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        main(tiny(tmp_path, max_steps=6, ckpt_interval=2, eval_interval=2))
    err = capsys.readouterr().err
    assert "interrupted: the checkpoint in" in err and "holds step 2: run the same command again" in err
    # a --resume=false run: the same command again would start over (and move this checkpoint aside)
    with pytest.raises(KeyboardInterrupt):
        main(tiny(tmp_path, max_steps=6, ckpt_interval=2, eval_interval=2, resume=False))
    assert "holds step 2: run the command again without --resume=false" in capsys.readouterr().err


def test_divergence_resumed_run_keeps_the_checkpoint_bytes(tmp_path):
    main(tiny(tmp_path, max_steps=4))
    path = tmp_path / "run" / "ckpt.safetensors"
    before = path.read_bytes()
    with pytest.raises(train_mod.TrainingDiverged):
        main(tiny(tmp_path, max_steps=12, lr=1e9, allow_config_change=True))
    assert path.read_bytes() == before


def _cli_train(tmp_path, *args):
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "selective_attention", "train", "--data=pydoc", "--n_layer=1", "--n_head=2",
           "--d_model=32", "--context_len=32", "--batch_size=4", "--eval_batches=1", "--progress=false",
           *args]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path)


def test_cli_divergence_is_one_error_line_and_exit_2(tmp_path):
    r = _cli_train(
        tmp_path, f"--out_dir={tmp_path / 'run'}", "--lr=1e9", "--max_steps=6", "--warmup_steps=2", "--eval_interval=3"
    )
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: training diverged at step"), r.stderr


def _flip_a_tensor_byte(path):
    raw = bytearray(path.read_bytes())
    header = 8 + int.from_bytes(raw[:8], "little")  # safetensors: u64 header size, JSON header, then data
    mid = header + (len(raw) - header) // 2
    raw[mid] ^= 0xFF
    path.write_bytes(bytes(raw))


def test_checksum_catches_corrupted_tensor_bytes(tmp_path):
    main(tiny(tmp_path, max_steps=4))
    path = tmp_path / "run" / "ckpt.safetensors"
    _flip_a_tensor_byte(path)
    with pytest.raises(CheckpointError, match=r"ckpt.safetensors.*checksum.*--resume=false"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="checksum"):
        main(tiny(tmp_path, max_steps=8))  # resuming refuses too


def test_checksum_covers_the_metadata(tmp_path):
    """One changed byte in a stored config (here rope_base, which changes every logit and no tensor) is refused,
    not loaded as another model; a format-4 file (checksum over the tensors only) still loads."""
    main(tiny(tmp_path, max_steps=4))
    path = tmp_path / "run" / "ckpt.safetensors"
    stored = json.dumps(load_checkpoint(path)[1]["model_config"])
    assert '"rope_base": 10000.0' in stored
    _rewrite_metadata(path, sign=False, model_config=stored.replace('"rope_base": 10000.0', '"rope_base": 18000.0'))
    with pytest.raises(CheckpointError, match=r"fails its checksum: its tensor bytes or metadata"):
        model_from_checkpoint(path)
    with pytest.raises(CheckpointError, match="fails its checksum"):
        main(tiny(tmp_path, max_steps=8))
    _rewrite_metadata(path, model_config=stored, format_version="4")  # as format 4 wrote it
    assert load_checkpoint(path)[1]["format_version"] == "4"
    _rewrite_metadata(path, sign=False, model_config=stored.replace('"rope_base": 10000.0', '"rope_base": 18000.0'))
    assert model_from_checkpoint(path)[0].config.rope_base == 18000.0  # what format 4 could not catch


def test_checkpoint_without_checksum_loads_with_a_warning_only_in_format_1(tmp_path):
    """Format 1 was written without a checksum (a warning); every later format with one, so a file of those
    without it had its metadata edited (its configs may no longer match its tensors): refused. A safetensors
    file without this library's metadata is named as such."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    main(tiny(tmp_path, max_steps=4))
    path = tmp_path / "run" / "ckpt.safetensors"
    v2_path = _as_format_2(path.parent, tmp_path / "old") / "ckpt.safetensors"
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    assert "checksum" in meta
    old = {k: v for k, v in meta.items() if k != "checksum"}
    save_file(tensors, str(path), metadata=old)
    with pytest.raises(CheckpointError, match=rf"\(format {checkpoint.FORMAT_VERSION}\) has no checksum.*edited"):
        load_checkpoint(path)
    # this file relabelled as format 1 (which is never checked) holds what format 1 never stored: refused
    save_file(tensors, str(path), metadata={**old, "format_version": "1"})
    with pytest.raises(CheckpointError, match=r"says format 1 but holds \['tokenizer', 'aliases', 'optimizer', "
                       r"'train_config.model'\].*edited"):  # fmt: skip
        load_checkpoint(path)
    with safe_open(str(v2_path), framework="pt") as f:
        v2, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    v1 = {k: v for k, v in v2.items() if k != "checksum"}
    save_file(tensors, str(path), metadata={**v1, "format_version": "1"})  # as format 1 wrote it
    with pytest.warns(UserWarning, match="no checksum"):
        loaded, m = load_checkpoint(path)
    assert m["step"] == 4 and loaded.keys() == tensors.keys()
    save_file(tensors, str(path), metadata={"format": "pt"})  # another library's weights
    with pytest.raises(CheckpointError, match="without selective-attention's metadata.*not a checkpoint of this"):
        load_checkpoint(path)
    hf_dir = tmp_path / "hf"  # a save_pretrained folder: the error says what it is
    hf_dir.mkdir()
    (hf_dir / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="no checkpoint at .*holds a Hugging Face model.*from_pretrained"):
        load_checkpoint(hf_dir)


def test_a_warmup_as_long_as_the_run_is_warned_about(tmp_path):
    """--warmup_steps >= --max_steps (the default 50 warmup steps in a 20-step run): the learning rate never
    reaches --lr and never decays. Training goes on, with a warning naming a shorter warmup."""
    with pytest.warns(UserWarning, match=r"--warmup_steps=6 > --max_steps=4.*to 0.002 at the last step, never "
                      r"--lr=0.003.*--warmup_steps=1"):  # fmt: skip
        main(tiny(tmp_path, max_steps=4, warmup_steps=6))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        main(tiny(tmp_path / "b", max_steps=4, warmup_steps=4))  # reaches --lr at the last step


def test_varassign_validation_examples_do_not_depend_on_the_batch_size(tmp_path):
    """Drawn a batch at a time, 16 x 1 and 8 x 2 validation examples shared none: runs (and evals) of other batch
    sizes scored other examples. Now the first n are the same whatever the batches."""
    rows = {}
    for batch_size, eval_batches in ((16, 1), (8, 2), (3, 6)):
        task = train_mod.Task(tiny(tmp_path, data="varassign", va_vars=4, va_assign=5, context_len=64,
                                   batch_size=batch_size, eval_batches=eval_batches))  # fmt: skip
        rows[batch_size] = torch.cat([x for x, _, _ in task.eval_batches()])
    assert torch.equal(rows[16], rows[8]) and torch.equal(rows[16][:16], rows[3][:16]) and rows[3].shape[0] == 18


def test_varassign_warns_when_training_draws_the_validation_examples(tmp_path):
    """2 variables and 1 assignment make 20 distinct examples: 4 x 4 training draws hold 55% of them, so the
    validation accuracy would not be held out (the count is exact: checked against enumeration)."""
    import itertools

    from selective_attention.data import VariableAssignment

    for n_vars, n_assign, n_values in [(3, 3, 2), (4, 2, 10), (2, 4, 3)]:
        names = itertools.product(range(n_vars), repeat=n_assign)
        assert VariableAssignment(n_vars, n_values, n_assign).n_examples() == sum(
            len(set(s)) * n_values**n_assign for s in names
        )
    with pytest.warns(UserWarning, match=r"--va_vars=2 --va_assign=1 has 20 distinct examples.*up to 16: about 55%"):
        main(tiny(tmp_path, data="varassign", va_vars=2, va_assign=1, max_steps=4, eval_interval=4, ckpt_interval=4))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        s = main(tiny(tmp_path / "b", data="varassign", va_vars=4, va_assign=5, max_steps=4, context_len=64))
    assert s["tokens_per_step"] == 4 * (4 * 5 + 3)  # batch x the example's length (it said batch x context_len)


def test_cli_prints_the_package_warnings_as_one_line_each(tmp_path):
    r = _cli_train(tmp_path, f"--out_dir={tmp_path / 'run'}", "--max_steps=2", "--warmup_steps=5")
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stderr.strip().splitlines() == [
        "warning: --warmup_steps=5 > --max_steps=2: the learning rate only warms up (to 0.0012 at the last step, "
        "never --lr=0.003) and never decays; pass a shorter warmup, e.g. --warmup_steps=1."
    ]


def test_checkpoint_metadata_of_the_wrong_kind_is_refused(tmp_path):
    """A config stored as a JSON list or string (an edit the checksum was recomputed over, or another program's
    file) is a CheckpointError naming the entry, not a TypeError deep in the loader or a model built from it."""
    main(tiny(tmp_path, max_steps=4))
    path = tmp_path / "run" / "ckpt.safetensors"
    good = path.read_bytes()
    for key, value, kind in [("model_config", "[1, 2]", "list"), ("train_config", '"lr"', "str"),
                             ("extra", "3", "int"), ("aliases", "null", "NoneType")]:  # fmt: skip
        _rewrite_metadata(path, **{key: value})
        with pytest.raises(CheckpointError, match=rf"metadata of the wrong kind \({{'{key}': '{kind}'}}"):
            model_from_checkpoint(path)
        path.write_bytes(good)


def _rewrite_tensor(path, name, change):
    """Replace the tensor ``name`` of a checkpoint by ``change(tensor)``, the checksum recomputed (an edit)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    tensors[name] = change(tensors[name])
    save_file(tensors, str(path), metadata=checkpoint.signed(tensors, meta))


@pytest.mark.parametrize(
    "change, message",
    [(lambda t: t.double(), r"another dtype than this model's \(torch.float32\).*'tok_emb.weight': 'torch.float64'"),
     (lambda t: t.to(torch.bfloat16), r"another dtype.*torch.bfloat16"),
     (lambda t: t.to(torch.int64), r"another dtype.*torch.int64"),
     (lambda t: t.index_fill(0, torch.tensor([3]), float("nan")),
      r"NaN or inf.*\[.tok_emb.weight., .lm_head.weight.\]"),
     (lambda t: t.index_fill(0, torch.tensor([0]), float("inf")), r"non-finite weights")],
)  # fmt: skip
def test_checkpoint_weights_that_training_never_writes_are_refused(tmp_path, change, message):
    """load_state_dict would cast a tensor of another dtype silently (float64 rounded, int weights made float) and
    load NaN or inf as they are (every logit NaN): training writes neither, so the file was edited or damaged.
    Evaluating and resuming both refuse it."""
    main(tiny(tmp_path, max_steps=4))
    path = tmp_path / "run" / "ckpt.safetensors"
    _rewrite_tensor(path, "model.tok_emb.weight", change)
    with pytest.raises(CheckpointError, match=message):
        model_from_checkpoint(path)
    with pytest.raises(CheckpointError, match=message):
        main(tiny(tmp_path, max_steps=8))


@pytest.mark.parametrize(
    "change, message",
    [(lambda t: t[:-1], r"'exp_avg' of parameter 0 \(shape .*\) has shape"),
     (lambda t: t.index_fill(0, torch.tensor([0]), float("nan")), r"'exp_avg' of parameter 0 .*non-finite")],
)  # fmt: skip
def test_optimizer_state_that_training_never_writes_is_refused(tmp_path, change, message):
    """The optimizer's moments were not checked: one of another shape crashed inside AdamW's first step, and a NaN
    stopped the run as "training diverged ... lower --lr", blaming the learning rate for a damaged file."""
    main(tiny(tmp_path, max_steps=4))
    path = tmp_path / "run" / "ckpt.safetensors"
    _rewrite_tensor(path, "optim.state.0.exp_avg", change)
    with pytest.raises(CheckpointError, match=message):
        main(tiny(tmp_path, max_steps=8))


@pytest.mark.parametrize(
    "edit, message",
    [({"history": "x"}, "'history' is not a list of log rows"),
     ({"history": [7]}, "'history' is not a list of log rows"),
     ({"data": {"source": "pydoc", "path": "/x"}}, "'data' .* is malformed"),
     ({"world_size": "1"}, "'world_size' is '1', not an int >= 1"),
     ("rng.torch", "the random state 'rng.torch' .* is missing")],
)  # fmt: skip
def test_a_training_state_that_training_never_writes_is_refused_on_resume(tmp_path, edit, message):
    """What a resume reads besides the weights (an edit signed again, another writer): a missing random state, a
    history that is no list of rows, a text record without its sha256 were raw KeyError / AttributeError tracebacks,
    and world_size "1" said "a run of 1 ... this one has 1". Each is now a CheckpointError naming it."""
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    main(tiny(tmp_path, max_steps=4))
    path = tmp_path / "run" / "ckpt.safetensors"
    with safe_open(str(path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    if isinstance(edit, str):
        del tensors[edit]
    else:
        meta["extra"] = json.dumps({**json.loads(meta["extra"]), **edit})
    save_file(tensors, str(path), metadata=checkpoint.signed(tensors, meta))
    with pytest.raises(CheckpointError, match=rf"cannot be resumed: {message}"):
        main(tiny(tmp_path, max_steps=8))
    model_from_checkpoint(path)  # the model itself still loads, for eval


def test_resume_refuses_a_changed_training_config(tmp_path):
    main(tiny(tmp_path, max_steps=4))
    with pytest.raises(CheckpointError, match=r"batch_size: 4 \(checkpoint\) vs 2 \(now\).*lr: 0.003.*0.001") as e:
        main(tiny(tmp_path, max_steps=8, lr=1e-3, batch_size=2))
    assert "--allow_config_change=true" in str(e.value)
    # extending the run and changing the bookkeeping is a normal resume
    s = main(tiny(tmp_path, max_steps=6, eval_interval=2, ckpt_interval=2))
    assert s["history"][-1]["step"] == 6
    s = main(tiny(tmp_path, max_steps=8, lr=1e-3, allow_config_change=True))
    assert s["history"][-1]["step"] == 8
    assert load_checkpoint(tmp_path / "run")[1]["train_config"]["lr"] == 1e-3


def test_a_refused_run_leaves_none_of_the_folders_it_made(tmp_path):
    """--data=/nonexistent --out_dir=nest/a/b removed b and left nest/a behind."""
    with pytest.raises(FileNotFoundError):
        main(tiny(tmp_path, data=str(tmp_path / "nonexistent"), out_dir=str(tmp_path / "nest" / "a" / "b")))
    assert not (tmp_path / "nest").exists()
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "mine.txt").write_text("a user's file")
    with pytest.raises(FileNotFoundError):
        main(tiny(tmp_path, data=str(tmp_path / "nonexistent"), out_dir=str(tmp_path / "kept" / "a" / "b")))
    assert sorted(p.name for p in (tmp_path / "kept").iterdir()) == ["mine.txt"]  # a folder that was there stays
    (tmp_path / "empty").mkdir()  # existing and empty, reached through a folder that does not exist
    with pytest.raises(FileNotFoundError):
        out = tmp_path / "missing" / ".." / "empty" / "r"
        main(tiny(tmp_path, data=str(tmp_path / "nonexistent"), out_dir=str(out)))
    assert (tmp_path / "empty").is_dir()  # was removed: "missing/../empty" looked new


def test_unusable_out_dir_fails_before_training(tmp_path, monkeypatch):
    (tmp_path / "afile").write_text("not a folder")

    def no_training(*a, **k):
        raise AssertionError("training started")

    monkeypatch.setattr(train_mod, "Task", no_training)
    with pytest.raises(ValueError, match=r"--out_dir=.*afile/sub.*writable"):
        main(tiny(tmp_path, out_dir=str(tmp_path / "afile" / "sub")))


@pytest.mark.parametrize(
    "option",
    ["--ckpt_interval=0", "--eval_interval=0", "--eval_batches=0", "--max_steps=-5", "--batch_size=-1",
     "--context_len=0", "--n_layer=0", "--lr=0", "--lr=nan", "--beta2=1", "--warmup_steps=-1", "--grad_clip=-1",
     "--val_fraction=0", "--dropout=1", "--stop_after=-1"],
)  # fmt: skip
def test_bad_options_are_clear_errors(option):
    with pytest.raises(ValueError, match=f"{option.split('=')[0]}={option.split('=')[1]}.*must be"):
        parse_overrides([option])


def test_flags_must_be_booleans():
    """From Python, a string is refused ("false" is truthy: the run would have compiled)."""
    for name in ("compile", "resume", "progress"):
        with pytest.raises(ValueError, match=f"--{name}='false' is invalid.*true or false"):
            TrainConfig.from_options({name: "false"})


def test_bad_selection_layers_and_devices_are_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match=r"--selection_layers: expects comma-separated ints like 0,2.*'a,b'"):
        parse_overrides(["--selection_layers=a,b"])
    with pytest.raises(ValueError, match=r"--selection_layers: expects comma-separated ints like 0,2.*','"):
        parse_overrides(["--selection_layers=,"])  # a list of no ints was None (every layer), silently
    assert parse_overrides(["--selection_layers="]).model.selection_layers is None  # an empty value: None, by design
    with pytest.raises(ValueError, match=r"--device='tpu'.*available here: auto, cpu"):
        main(tiny(tmp_path, device="tpu"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(ValueError, match=r"--device='cuda'.*no CUDA device.*available here: auto, cpu"):
        main(tiny(tmp_path, device="cuda"))


def test_log_after_a_resume_has_each_step_once(tmp_path):
    kw = dict(max_steps=8, eval_interval=2, ckpt_interval=4)
    main(tiny(tmp_path, stop_after=6, **kw))  # logs 2, 4, 6; the checkpoint is at 4
    log = tmp_path / "run" / "log.jsonl"
    assert [json.loads(x)["step"] for x in log.read_text().splitlines()] == [2, 4, 6]
    main(tiny(tmp_path, **kw))  # resumes at 4: step 6 is trained again and logged once
    assert [json.loads(x)["step"] for x in log.read_text().splitlines()] == [2, 4, 6, 8]
    main(tiny(tmp_path, resume=False, max_steps=4, eval_interval=2))  # a fresh run starts a fresh log
    assert [json.loads(x)["step"] for x in log.read_text().splitlines()] == [2, 4]


def test_progress_to_a_pipe_is_a_few_plain_lines(tmp_path, capsys):
    main(tiny(tmp_path, max_steps=40, eval_interval=20, ckpt_interval=40, progress=True))
    err = capsys.readouterr().err
    assert "\r" not in err
    assert 1 <= len(err.splitlines()) <= 11 and "40/40" in err.splitlines()[-1]


def test_evaluate_leaves_the_model_in_its_mode():
    from selective_attention.model import GPT
    from selective_attention.train import Task, evaluate

    cfg = TrainConfig.from_options(
        dict(data="pydoc", n_layer=1, d_model=32, n_head=2, context_len=32, batch_size=2, eval_batches=1)
    )
    model = GPT(cfg.model)
    for mode in (False, True):
        model.train(mode)
        evaluate(model, Task(cfg), torch.device("cpu"))
        assert model.training is mode


# --- checkpoint format: state-dict APIs, version check, older formats, model config fields ----------------
def _rewrite_metadata(path, sign=True, **changes):
    """Rewrite a checkpoint's metadata, with the checksum its format version has (as a writer of that version, or
    another program writing a consistent file, would), or (``sign=False``) the old checksum left as it was."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    meta = {**meta, **changes}
    save_file(tensors, str(path), metadata=checkpoint.signed(tensors, meta) if sign else meta)


def _write_format_2(path, cfg, model, opt, step, history, rng):
    """A checkpoint as format 2 wrote it (the code before format 3): the model without the tied lm_head, one
    parameter group's optimizer state as optim.{i}.{name}, the model fields flat in train_config, no GPTConfig.extra.
    ``rng``: the rng.torch and rng.data tensors the loop saved."""
    import dataclasses

    from safetensors.torch import save_file

    tensors = {f"model.{k}": v.detach().clone() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    for i, p in enumerate(opt.param_groups[0]["params"]):
        for name, val in opt.state.get(p, {}).items():
            tensors[f"optim.{i}.{name}"] = torch.as_tensor(val).detach().clone()
    tensors.update(rng)
    flat = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "model"}
    m = cfg.model
    layers = ",".join(map(str, m.selection_layers or ()))  # format 2: "0,2", "" = every layer; d_head 0 = auto
    flat.update(n_layer=m.n_layer, n_head=m.n_head, d_model=m.d_model, d_head=m.d_head or 0, context_len=m.context_len,
                dropout=m.dropout, selection=m.selection, selection_layers=layers, selection_head=m.selection_head,
                selection_per_head=m.selection_per_head, selection_projection=m.selection_projection,
                memory_eps=m.memory_eps, memory_tau=m.memory_tau)  # fmt: skip
    model_config = dataclasses.asdict(model.config)
    model_config.pop("extra")
    meta = {"format_version": "2", "step": str(step), "train_config": json.dumps(flat),
            "model_config": json.dumps(model_config), "extra": json.dumps({"history": history}),
            "checksum": "sha256:" + checkpoint.tensors_checksum(tensors)}  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=meta)


def _as_format_2(src, dst_root):
    """Write the run at ``src`` again, in format 2, as the run of ``tiny(dst_root)``; returns its folder."""
    tensors, meta = load_checkpoint(src)
    cfg = tiny(dst_root, max_steps=meta["step"])
    model, _ = model_from_checkpoint(src)
    opt = train_mod._optimizer(model, cfg)
    opt.load_state_dict(train_mod.optimizer_state(tensors, meta, opt))
    rng = {k: tensors[k] for k in ("rng.torch", "rng.data")}
    _write_format_2(dst_root / "run" / "ckpt.safetensors", cfg, model, opt, meta["step"], meta["extra"]["history"], rng)
    return dst_root / "run"


def test_evaluate_weighs_every_target_token_alike():
    """A smaller last batch (and varassign's one target per row) counts per token, not per batch: the loss is
    the plain mean over every target of every batch, here of unequal sizes."""
    import torch.nn.functional as F

    from selective_attention.model import GPT, GPTConfig
    from selective_attention.train import evaluate

    gen = torch.Generator().manual_seed(0)
    batches = []
    for rows in (5, 2):
        x = torch.randint(0, 32, (rows, 12), generator=gen)
        y = torch.randint(0, 32, (rows, 12), generator=gen)
        y[:, : rows * 2] = -100  # unequal numbers of targets per batch, too
        batches.append((x, y, None))

    class Batches:
        def eval_batches(self):
            return iter(batches)

    model = GPT(GPTConfig(vocab_size=32, context_len=12, n_layer=1, n_head=2, d_model=16)).eval()
    with torch.no_grad():
        logits = torch.cat([model(x).flatten(0, 1) for x, _, _ in batches])
        ref = F.cross_entropy(logits, torch.cat([y.flatten() for _, y, _ in batches])).item()
    per_batch = [F.cross_entropy(model(x).flatten(0, 1), y.flatten()).item() for x, y, _ in batches]
    assert abs(sum(per_batch) / 2 - ref) > 1e-3  # the two averages differ here, so the test can fail
    assert evaluate(model, Batches(), torch.device("cpu"))["val_loss"] == pytest.approx(ref, rel=1e-6)


def test_resume_with_fewer_max_steps_than_trained_is_refused(tmp_path):
    main(tiny(tmp_path, max_steps=8))
    with pytest.raises(CheckpointError, match=r"at step 8, past --max_steps=4.*--max_steps >= 8"):
        main(tiny(tmp_path, max_steps=4))
    assert main(tiny(tmp_path, max_steps=8))["val_loss"] is not None  # equal: nothing left to train, not an error


def test_a_run_with_an_inert_option_from_before_its_refusal_still_resumes(tmp_path):
    """Options with no effect are refused when given, but a checkpoint written before may hold any value for them:
    resuming compares only what has an effect (memory_tau with the memory loss off was a dead end)."""
    import dataclasses

    base = tiny(tmp_path, max_steps=4)
    old = dataclasses.replace(base, bpe_vocab_size=1000, model=dataclasses.replace(base.model, memory_tau=2.0))
    main(old)  # built directly, as such a config could be before
    s = main(tiny(tmp_path, max_steps=8))
    assert [row["step"] for row in s["history"]] == [4, 8]
    with pytest.raises(CheckpointError, match="another config: lr"):  # a field with an effect is still compared
        main(tiny(tmp_path, max_steps=12, lr=1e-2))


def test_save_checkpoint_takes_the_older_single_data_stream(tmp_path):
    from selective_attention.model import GPT

    cfg = tiny(tmp_path)
    model = GPT(dataclasses_replace_vocab(cfg.model))
    opt = torch.optim.AdamW(model.parameters())
    state = torch.Generator().manual_seed(3).get_state()
    checkpoint.save_checkpoint(tmp_path / "c.safetensors", model, opt, 1, cfg, data_rng=state)
    assert torch.equal(load_checkpoint(tmp_path / "c.safetensors")[0]["rng.data"], state)


def dataclasses_replace_vocab(model_cfg, vocab=256):
    import dataclasses

    return dataclasses.replace(model_cfg, vocab_size=vocab)


def test_varassign_training_stream_never_is_the_validation_stream(tmp_path):
    """Rank r trains on the stream of seed + 1000 r; the validation examples are the stream of VA_VAL_SEED."""
    cfg = tiny(tmp_path, data="varassign", va_vars=3, va_assign=5, context_len=64)
    assert train_mod.data_seed(cfg, 0) == cfg.seed and train_mod.data_seed(cfg, 2) == cfg.seed + 2000
    bad = tiny(tmp_path, data="varassign", va_vars=3, va_assign=5, context_len=64, seed=train_mod.VA_VAL_SEED)
    with pytest.raises(ValueError, match=r"--seed=12345 makes rank 0's varassign training stream"):
        main(bad)
    with pytest.raises(ValueError, match=r"rank 1's"):
        train_mod.data_seed(tiny(tmp_path, data="varassign", seed=train_mod.VA_VAL_SEED - 1000), 1)
    # torch seeds its CPU generator with the low 32 bits: these were the validation stream too, and passed
    for alias in (train_mod.VA_VAL_SEED + 2**32, train_mod.VA_VAL_SEED - 2**32):
        draws = [torch.randint(0, 10**6, (8,), generator=torch.Generator().manual_seed(s)) for s in (alias, 12345)]
        assert torch.equal(*draws)  # the same stream
        with pytest.raises(ValueError, match=r"low 32 bits"):
            train_mod.data_seed(tiny(tmp_path, data="varassign", seed=alias), 0)
    # what the refusal prevents: that seed's training batches are the validation batches
    task = train_mod.Task(dataclasses.replace(bad, batch_size=train_mod.VA_VAL_DRAW, eval_batches=1))
    x, _ = task.batch(torch.Generator().manual_seed(train_mod.VA_VAL_SEED))  # rank 0 of --seed=12345
    xv, _, _ = next(task.eval_batches())
    assert torch.equal(x, xv)
    assert train_mod.data_seed(tiny(tmp_path, seed=train_mod.VA_VAL_SEED), 0) == train_mod.VA_VAL_SEED  # text data


def test_format_2_checkpoint_loads_for_eval(tmp_path):
    main(tiny(tmp_path / "new", max_steps=4))
    old = _as_format_2(tmp_path / "new" / "run", tmp_path / "old")
    new_model, _ = model_from_checkpoint(tmp_path / "new" / "run")
    old_model, meta = model_from_checkpoint(old)
    assert meta["format_version"] == "2" and meta["train_config"]["model"]["selection"] is True
    assert old_model.lm_head.weight is old_model.tok_emb.weight
    x = torch.randint(0, old_model.config.vocab_size, (2, 16))
    assert torch.equal(old_model(x), new_model(x))


def test_format_2_resume_is_exact(tmp_path):
    """Resuming a format 2 checkpoint is bit for bit resuming the same run saved in the current format."""
    main(tiny(tmp_path / "a", max_steps=4))
    _as_format_2(tmp_path / "a" / "run", tmp_path / "b")
    a, b = main(tiny(tmp_path / "a", max_steps=8)), main(tiny(tmp_path / "b", max_steps=8))

    def strip(h):
        return [{k: v for k, v in row.items() if k != "tokens_per_s"} for row in h]

    assert strip(a["history"]) == strip(b["history"]) and [r["step"] for r in a["history"]] == [4, 8]
    (ta, _), (tb, mb) = load_checkpoint(tmp_path / "a" / "run"), load_checkpoint(tmp_path / "b" / "run")
    assert mb["format_version"] == checkpoint.FORMAT_VERSION  # saved again in the current format
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def test_unknown_format_version_is_a_clear_error(tmp_path):
    main(tiny(tmp_path, max_steps=4))
    path = tmp_path / "run" / "ckpt.safetensors"
    _rewrite_metadata(path, format_version="99")
    with pytest.raises(CheckpointError, match=r"format version '99'.*reads versions 1, 2, 3.*upgrade"):
        model_from_checkpoint(path)
    with pytest.raises(CheckpointError, match="format version '99'"):
        main(tiny(tmp_path, max_steps=8))
    _rewrite_metadata(path, format_version="banana")  # not a version at all: not "upgrade"
    with pytest.raises(CheckpointError, match="'banana'.*no version selective-attention has written"):
        model_from_checkpoint(path)


def test_an_alias_naming_a_stored_tensor_is_refused(tmp_path):
    """Tied weights are stored once, the others named by aliases: an alias that names a stored tensor (an edited
    file, signed again, or another writer) replaced it, silently (norm2 loaded as norm1)."""
    import json

    main(tiny(tmp_path, max_steps=2))
    path = tmp_path / "run" / "ckpt.safetensors"
    _rewrite_metadata(path, aliases=json.dumps({"lm_head.weight": "tok_emb.weight", "blocks.0.norm2.weight": "x"}))
    with pytest.raises(CheckpointError, match="alias 'blocks.0.norm2.weight' -> 'x' names a tensor the file"):
        model_from_checkpoint(path)


def test_checkpoint_missing_a_model_field_loads_and_resumes(tmp_path):
    """A GPTConfig field added after a checkpoint was written takes its default: not "another model"."""
    main(tiny(tmp_path, max_steps=4))
    path = tmp_path / "run" / "ckpt.safetensors"
    stored = dict(load_checkpoint(path)[1]["model_config"])
    del stored["rope_base"], stored["extra"]
    _rewrite_metadata(path, model_config=json.dumps(stored))
    model, meta = model_from_checkpoint(path)
    assert "rope_base" not in meta["model_config"] and model.config.rope_base == 10000.0
    s = main(tiny(tmp_path, max_steps=8))
    assert [row["step"] for row in s["history"]] == [4, 8]
    _rewrite_metadata(path, model_config=json.dumps(stored))
    with pytest.raises(CheckpointError, match=r"another model.*'rope_base': \(10000.0, 500.0\)"):
        main(tiny(tmp_path, max_steps=12, rope_base=500.0))


def test_checkpoint_keeps_gpt_config_extra_and_any_param_groups(tmp_path):
    import dataclasses

    from selective_attention.model import GPT, GPTConfig

    cfg = tiny(tmp_path, max_steps=4)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, extra={"note": "run 7", "tags": [1, 2]}))
    main(cfg)
    model, meta = model_from_checkpoint(tmp_path / "run")
    assert model.config.extra == {"note": "run 7", "tags": [1, 2]}
    # two parameter groups, other hyperparameters per group: the state dict round-trips exactly
    model = GPT(GPTConfig(vocab_size=256, context_len=16, n_layer=1, n_head=2, d_model=16))
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay}, {"params": rest, "weight_decay": 0.0}], lr=1e-3)
    loss, _ = model(torch.randint(0, 256, (2, 16)), torch.randint(0, 256, (2, 16)))
    loss.backward()
    opt.step()
    path = tmp_path / "two" / "ckpt.safetensors"
    train_mod.save_checkpoint(path, model, opt, 1, cfg)
    tensors, meta = load_checkpoint(path)
    fresh = torch.optim.AdamW([{"params": decay}, {"params": rest, "weight_decay": 0.0}], lr=1e-3)
    fresh.load_state_dict(train_mod.optimizer_state(tensors, meta, fresh))
    a, b = opt.state_dict(), fresh.state_dict()
    assert [g["weight_decay"] for g in b["param_groups"]] == [0.01, 0.0]
    assert a["state"].keys() == b["state"].keys()
    assert all(torch.equal(a["state"][i][k], b["state"][i][k]) for i in a["state"] for k in a["state"][i])


def test_options_as_key_value_or_key_space_value():
    a = parse_overrides(["--lr=1e-3", "--selection=true", "--n_layer=3", "--d_head=none", "--no-progress"])
    b = parse_overrides(["--lr", "1e-3", "--selection", "--n-layer", "3", "--progress", "false"])
    assert a == b and a.model.d_head is None and a.progress is False
    assert parse_overrides(["--selection_layers="]).model.selection_layers is None
    with pytest.raises(ValueError, match=r"unknown option --n_layers \(did you mean --n_layer"):
        parse_overrides(["--n_layers=3"])
    with pytest.raises(ValueError, match="unknown option --vocab_size"):  # set from the data
        parse_overrides(["--vocab_size=300"])
    with pytest.raises(ValueError, match=r"d_model \(30\) must be divisible by n_head \(4\)"):  # GPTConfig's check
        parse_overrides(["--d_model=30"])


def test_train_config_from_a_format_2_dict():
    import dataclasses

    old = {"data": "pydoc", "n_layer": 3, "d_head": 0, "selection": True, "selection_layers": "0,2", "lr": 1e-3,
           "gone": 1}  # fmt: skip
    cfg = TrainConfig.from_dict(old)
    assert (cfg.data, cfg.lr, cfg.model.n_layer, cfg.model.d_head, cfg.model.selection_layers) == (
        "pydoc", 1e-3, 3, None, (0, 2),
    )  # fmt: skip
    stored = json.loads(json.dumps(dataclasses.asdict(cfg)))  # as a checkpoint stores it
    assert TrainConfig.from_dict(stored) == cfg


def test_resuming_a_finished_run_reports_its_logged_throughput(tmp_path):
    first = main(tiny(tmp_path, max_steps=4))
    again = main(tiny(tmp_path, max_steps=4, resume=True))  # nothing left to train
    assert first["tokens_per_s"] > 0 and again["tokens_per_s"] == first["history"][-1]["tokens_per_s"]


def test_a_second_run_into_the_same_folder_at_once_is_refused(tmp_path):
    """Two runs writing one out_dir at once mixed their log.jsonl rows and checkpoints (or one died on the other's
    temporary file): a live run's lock refuses the second, naming its process; a killed run's lock is taken over,
    and a finished run leaves none."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from selective_attention.train import LOCK_NAME

    cfg = tiny(tmp_path, max_steps=2)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True)
    (out / LOCK_NAME).write_text(str(os.getppid()))  # a live process that is not this one
    with pytest.raises(ValueError, match=rf"another training run \(process {os.getppid()}\) is writing to --out_dir"):
        main(cfg)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    (out / LOCK_NAME).write_text(str(gone.pid))  # a killed run's lock
    main(cfg)
    assert not (out / LOCK_NAME).exists() and not list(out.glob(f"{LOCK_NAME}.*"))


def test_a_failed_checkpoint_write_is_a_clear_error_and_keeps_the_last_one(tmp_path, monkeypatch):
    """A full disk during a save ended in safetensors' raw error: now a CheckpointError naming the file and the fix,
    the checkpoint already there intact, no temporary file left."""
    from pathlib import Path

    import safetensors.torch

    main(tiny(tmp_path, max_steps=2))
    path = Path(tiny(tmp_path).out_dir) / checkpoint.CKPT_NAME
    before = path.read_bytes()

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    with pytest.raises(checkpoint.CheckpointError, match=r"could not write the checkpoint .*No space left.*intact"):
        main(tiny(tmp_path, max_steps=4, ckpt_interval=1))
    assert path.read_bytes() == before and not list(path.parent.glob("*.tmp"))


def test_a_text_file_named_another_way_resumes(tmp_path, monkeypatch):
    """Trained on --data=t.txt in one folder, resumed from another folder with the same file's absolute path: the same
    text (path and sha256), so no config change (it was refused, and the advice, --data=t.txt, then failed there).
    Another file still is a change."""
    from pathlib import Path

    text = tmp_path / "t.txt"
    text.write_text("In the beginning God created the heaven and the earth. " * 300)
    out = str(tmp_path / "run")
    monkeypatch.chdir(tmp_path)
    main(tiny(tmp_path, data="t.txt", out_dir=out, max_steps=4, tokenizer="byte"))
    monkeypatch.chdir(tmp_path.parent)
    summary = main(tiny(tmp_path, data=str(text), out_dir=out, max_steps=6, tokenizer="byte"))
    assert summary["history"][-1]["step"] == 6
    other = Path(tmp_path / "u.txt")
    other.write_text(text.read_text())  # the same content, another file
    changed = r"another config: data: '.*t\.txt' \(checkpoint\) vs '.*u\.txt' \(now\)"
    with pytest.raises(checkpoint.CheckpointError, match=changed):
        main(tiny(tmp_path, data=str(other), out_dir=out, max_steps=8, tokenizer="byte"))


def test_resume_sees_every_layer_listed_as_every_layer(tmp_path):
    """``selection_layers`` naming every layer is the model without it: a resume without the option continues."""
    main(tiny(tmp_path, max_steps=2, n_layer=1, selection=True, selection_layers=[0]))
    s = main(tiny(tmp_path, max_steps=3, n_layer=1, selection=True))  # was refused as "another model"
    assert [h["step"] for h in s["history"]][-1] == 3


def test_resume_refuses_a_seed_or_split_it_could_not_apply_and_names_a_longer_schedule(tmp_path, capsys):
    """A new --seed was recorded in the checkpoint but never used (the random states come from it), and a new
    --val_fraction moved trained-on text into validation: both refused, even with --allow_config_change. A longer
    --max_steps recomputes the schedule: a note says so, and each log row carries its step's lr."""
    main(tiny(tmp_path, max_steps=4))
    for change in (dict(seed=5), dict(val_fraction=0.3)):
        with pytest.raises(CheckpointError, match=f"--{next(iter(change))}=.*differs from the checkpoint's"):
            main(tiny(tmp_path, max_steps=6, allow_config_change=True, **change))
    with pytest.raises(ValueError, match="--min_lr=0.01 is above --lr"):  # changed on resume: refused as for a new run
        main(tiny(tmp_path, max_steps=6, min_lr=0.01, allow_config_change=True))
    capsys.readouterr()
    s = main(tiny(tmp_path, max_steps=8))
    assert "the checkpoint's run was planned for 4: the learning-rate schedule is recomputed" in capsys.readouterr().err
    cfg = tiny(tmp_path, max_steps=8)
    rows = [row for row in s["history"] if row["step"] > 4]
    assert rows and all(row["lr"] == pytest.approx(lr_at(row["step"] - 1, cfg), rel=1e-3) for row in rows)


def test_a_rank_without_its_world_is_refused(tmp_path, monkeypatch):
    """RANK=1 alone (no WORLD_SIZE) trained on rank 1's stream and wrote nothing, since only rank 0 writes; rc 0."""
    monkeypatch.setenv("RANK", "1")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(ValueError, match=r"RANK=1 with WORLD_SIZE=\(unset\).*unset RANK"):
        main(tiny(tmp_path))
    assert not (tmp_path / "run").exists()


def test_a_stored_config_with_an_empty_out_dir_still_loads():
    """The refusal of an empty --out_dir is a run's: an older checkpoint whose config stored one must still load (for
    eval, or to resume into another folder)."""
    assert TrainConfig.from_dict({"out_dir": "", "data": "pydoc"}).out_dir == ""


def test_path_objects_and_a_torch_device_train_and_save_like_their_text(tmp_path):
    """Path objects for data and out_dir, and a torch.device, passed every check and trained, then failed at the first
    checkpoint save (the config is stored as JSON): the run's steps were lost."""
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    cfg = tiny(tmp_path, data=text, out_dir=tmp_path / "run", device=torch.device("cpu"), max_steps=4)
    assert (cfg.data, cfg.out_dir, cfg.device) == (str(text), str(tmp_path / "run"), "cpu")
    cfg.out_dir = tmp_path / "run2"  # assigned after construction: main converts it too
    main(cfg)
    _, meta = load_checkpoint(tmp_path / "run2")
    assert meta["train_config"]["data"] == str(text) and meta["step"] == 4


def test_an_option_the_run_would_ignore_is_refused_by_name(tmp_path):
    with pytest.raises(ValueError, match=r"vocab_size=1000 would be ignored: a run sets it from its tokenizer"):
        tiny(tmp_path, vocab_size=1000)


def _edit_checkpoint(path, edit) -> None:
    """Rewrite a checkpoint through ``edit(tensors, meta)`` (metadata as decoded JSON) and sign it again: an edit or
    another writer, which the checksum cannot tell from training's own file."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        raw, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    meta = {k: (v if k in ("format_version", "step", "checksum") else json.loads(v)) for k, v in raw.items()}
    edit(tensors, meta)
    raw = {k: (v if isinstance(v, str) else json.dumps(v)) for k, v in meta.items()}
    save_file(tensors, str(path), metadata=checkpoint.signed(tensors, raw))


def _drop_moments(tensors, meta):
    for k in [k for k in tensors if k.startswith("optim.state.")]:
        del tensors[k]
    meta["optimizer"]["state"] = {}


@pytest.mark.parametrize(
    "edit, message, on",
    [(lambda t, m: m.update(step="-3"), r"at step -3, which training never writes", "load"),
     (lambda t, m: t.update({"model.lm_head.weight": t["model.tok_emb.weight"] + 1}) or m["aliases"].clear(),
      r"different values for the tied weights \['tok_emb.weight', 'lm_head.weight'\]", "load"),
     (lambda t, m: m["model_config"].update(mlp_ratio=1e9), r"model config does not fit its tensors", "load"),
     (lambda t, m: t["optim.state.0.step"].fill_(float("nan")), r"'step' of parameter 0 .* non-finite", "resume"),
     (lambda t, m: t["optim.state.0.exp_avg_sq"].neg_().sub_(1), r"'exp_avg_sq' of parameter 0 .* negative", "resume"),
     (_drop_moments, r"at step 4 but holds no optimizer state", "resume"),
     (lambda t, m: m["optimizer"].update(state=[]), r"optimizer record is not as training writes it", "resume"),
     (lambda t, m: t.update({"optim.state.abc.exp_avg": t.pop("optim.state.0.exp_avg")}),
      r"optimizer record is not as training writes it \(ValueError", "resume"),
     (lambda t, m: t.update({"rng.torch": t["rng.torch"][:100]}), r"'rng.torch' \(1-D uint8, 5056 bytes\)", "resume"),
     (lambda t, m: t.update({"rng.data": t["rng.data"][:100]}), r"data-stream random state \(rng.data;", "resume"),
     (lambda t, m: m["train_config"].update(lr="fast"), r"--lr='fast' is invalid: it must be a finite", "resume"),
     (lambda t, m: m["train_config"].update(data=5), r"--data=5 is invalid: it must be a text", "resume")],
)  # fmt: skip
def test_a_consistent_but_malformed_checkpoint_is_refused_by_name(tmp_path, edit, message, on):
    """Each of these loaded a silently wrong run or model (a negative step trained at a negative learning rate; the
    stored lm_head replaced the embedding it is tied to; a NaN step count or negative second moments were reported
    as 'training diverged, lower --lr'; a run with every moment dropped resumed from fresh ones), or stopped on a
    raw traceback (a random state of another length, an optimizer record of another shape, an absurd size that
    allocated the model before the shapes were compared, a config value of another kind)."""
    main(tiny(tmp_path, max_steps=4))
    path = tmp_path / "run" / "ckpt.safetensors"
    _edit_checkpoint(path, edit)
    with pytest.raises(CheckpointError, match=message):
        if on == "load":
            model_from_checkpoint(path)
        main(tiny(tmp_path, max_steps=8))


def test_eval_refuses_a_malformed_text_record_or_config_by_name(tmp_path, capsys):
    from selective_attention.cli import main as cli

    main(tiny(tmp_path, max_steps=2))
    path = tmp_path / "run" / "ckpt.safetensors"
    _edit_checkpoint(path, lambda t, m: m["extra"].update(data="x"))
    assert cli(["eval", "--ckpt", str(path), "--batches", "1"]) == 2
    assert "record of its training text ('x') is not as training writes it" in capsys.readouterr().err
    assert cli(["eval", "--ckpt", str(path), "--batches", "1", "--data", "pydoc"]) == 0  # a text named: not needed
    _edit_checkpoint(path, lambda t, m: m["train_config"].update(data=5))
    assert cli(["eval", "--ckpt", str(path), "--batches", "1", "--data", "pydoc"]) == 2
    err = capsys.readouterr().err
    assert "holds a training config this code refuses (--data=5 is invalid: it must be a text" in err


def test_a_resume_through_a_linked_checkpoint_writes_the_linked_file(tmp_path):
    """A checkpoint linked from other storage: the next save replaced the link with a plain file on the run folder's
    disk, and the linked file stayed at the old step."""
    main(tiny(tmp_path, max_steps=4))
    run = tmp_path / "run"
    elsewhere = tmp_path / "storage" / "ckpt.safetensors"
    elsewhere.parent.mkdir()
    (run / "ckpt.safetensors").rename(elsewhere)
    (run / "ckpt.safetensors").symlink_to(elsewhere)
    main(tiny(tmp_path, max_steps=8))
    assert (run / "ckpt.safetensors").is_symlink()
    assert checkpoint.load_checkpoint(elsewhere)[1]["step"] == 8


def test_a_changed_selection_is_one_difference_not_two():
    from selective_attention.model import GPTConfig

    stored, now = GPTConfig(selection=True), GPTConfig(selection=False)
    assert checkpoint._model_diff(stored, now) == {"selection": (True, False)}


def test_train_config_from_dict_takes_paths_and_devices_as_the_constructor_does(tmp_path):
    from pathlib import Path

    cfg = TrainConfig.from_dict({"data": Path("kjv"), "out_dir": tmp_path, "device": torch.device("cpu")})
    assert (cfg.data, cfg.out_dir, cfg.device) == ("kjv", str(tmp_path), "cpu")
    with pytest.raises(ValueError, match="--data=5 is invalid: it must be a text"):
        TrainConfig.from_dict({"data": 5})


def test_no_clipping_reports_the_same_norm_on_every_torch(tmp_path, monkeypatch):
    """--grad_clip=0 logs the gradient norm without clipping, also where torch.nn.utils.get_total_norm is missing
    (torch < 2.6, within the declared torch>=2.5): the two ways agree."""
    torch.manual_seed(0)
    model = train_mod.GPT(train_mod.GPTConfig(vocab_size=40, context_len=8, n_layer=1, n_head=2, d_model=16))
    model(torch.randint(0, 40, (2, 8)), torch.randint(0, 40, (2, 8)))[0].backward()
    grads = [p.grad.clone() for p in model.parameters()]
    norm = train_mod._grad_norm(model, 0.0)
    monkeypatch.delattr(torch.nn.utils, "get_total_norm", raising=False)  # absent before torch 2.6
    assert torch.equal(train_mod._grad_norm(model, 0.0), norm)
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))  # unclipped, to the bit


def test_checkpoint_checksum_needs_no_numpy(monkeypatch):
    """The checksum read each tensor's bytes through Tensor.numpy(), and torch's CPU wheel does not install NumPy:
    saving and loading failed with "Numpy is not available". The bytes are read in place now, the same bytes (old
    checkpoints' checksums hold), for every dtype and an empty tensor."""
    from selective_attention.checkpoint import tensors_checksum

    g = torch.Generator().manual_seed(0)
    tensors = {
        "f32": torch.randn(3, 5, generator=g),
        "bf16": torch.randn(4, generator=g).to(torch.bfloat16),
        "f16": torch.randn(2, 2, generator=g).half(),
        "i64": torch.arange(7),
        "b": torch.tensor([True, False, True]),
        "empty": torch.zeros(0, 3),
        "strided": torch.randn(4, 6, generator=g)[:, ::2],  # made contiguous first
    }
    with_numpy = tensors_checksum(tensors, {"a": "1"})
    import hashlib

    h = hashlib.sha256()  # the bytes as NumPy gave them (the code before)
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    h.update(b"1:a=1:1")
    assert with_numpy == h.hexdigest()

    def no_numpy(self, *a, **k):
        raise RuntimeError("Numpy is not available")

    monkeypatch.setattr(torch.Tensor, "numpy", no_numpy)
    assert tensors_checksum(tensors, {"a": "1"}) == with_numpy


def test_a_missing_safetensors_is_named_before_training(monkeypatch, tmp_path):
    """Without safetensors a run trained to its first checkpoint and failed with "No module named 'safetensors'";
    it is refused before training now, naming the extra."""
    import sys

    monkeypatch.setitem(sys.modules, "safetensors", None)  # import safetensors raises ImportError
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    with pytest.raises(ImportError, match=r"selective-attention\[train\]"):
        main(tiny(tmp_path))
    assert not (tmp_path / "run" / "log.jsonl").exists()
