"""The training loop: learning, exact resume, atomic checkpoints, config overrides."""

import json

import pytest
import torch

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
    return TrainConfig(**base)


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

    def strip(h):  # everything but the wall-clock throughput
        return [{k: v for k, v in row.items() if k != "tokens_per_s"} for row in h]

    assert strip(resumed["history"]) == strip(ref["history"])
    ta, ma = load_checkpoint(tmp_path / "a" / "run")
    tb, mb = load_checkpoint(tmp_path / "b" / "run")
    assert ma["step"] == mb["step"] == 12
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k


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


def test_resume_false_starts_over(tmp_path):
    main(tiny(tmp_path, max_steps=4))
    s = main(tiny(tmp_path, max_steps=4, resume=False, d_model=64))
    assert s["history"][-1]["step"] == 4


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
    assert (cfg.lr, cfg.selection, cfg.n_layer, cfg.data) == (1e-3, True, 3, "pydoc")
    assert cfg.model_config().selection_layers == (0, 2)
    with pytest.raises(ValueError, match="unknown option --lrr"):
        parse_overrides(["--lrr=1"])
    with pytest.raises(ValueError, match="expects int"):
        parse_overrides(["--n_layer=two"])
    with pytest.raises(ValueError, match="true/false"):
        parse_overrides(["--selection=maybe"])
    with pytest.raises(ValueError, match="--key=value"):
        parse_overrides(["lr"])


def test_checkpoint_holds_optimizer_and_rng(tmp_path):
    main(tiny(tmp_path, max_steps=4))
    tensors, meta = load_checkpoint(tmp_path / "run")
    assert any(k.startswith("optim.") and k.endswith("exp_avg") for k in tensors)
    assert "rng.torch" in tensors and "rng.data" in tensors
    assert meta["train_config"]["max_steps"] == 4 and train_mod.FORMAT_VERSION == meta["format_version"]


def test_ddp_two_processes_keep_replicas_in_sync(tmp_path):
    """torchrun with 2 CPU processes (gloo): each rank sees other data, yet the replicas stay equal,
    so the gradients were averaged."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "selective_attention", "train",
           "--data=pydoc", f"--out_dir={tmp_path / 'ddp'}", "--n_layer=1", "--n_head=2", "--d_model=32",
           "--context_len=32", "--batch_size=4", "--max_steps=4", "--eval_interval=4", "--eval_batches=1",
           "--progress=false", "--selection=true"]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    # the ranks' own errors come before torchrun's summary of them: show those lines, not just the tail
    errors = [ln for ln in r.stderr.splitlines() if any(w in ln for w in ("Error", "terminate", "what()", "exitcode"))]
    assert r.returncode == 0, "\n".join(errors[:40]) + "\n...\n" + r.stderr[-1500:]
    summaries = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert sorted(s["rank"] for s in summaries) == [0, 1]
    assert summaries[0]["param_checksum"] == summaries[1]["param_checksum"]
    assert (tmp_path / "ddp" / "ckpt.safetensors").exists()


def test_varassign_targets_only_the_answer(tmp_path):
    task = train_mod._Task(tiny(tmp_path, data="varassign", va_vars=3, va_assign=5, context_len=64))
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
    r = _cli_train(tmp_path, f"--out_dir={tmp_path / 'run'}", "--lr=1e9", "--max_steps=6", "--eval_interval=3")
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


def test_checkpoint_without_checksum_loads_with_a_warning(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    main(tiny(tmp_path, max_steps=4))
    path = tmp_path / "run" / "ckpt.safetensors"
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    assert "checksum" in meta
    old = {k: v for k, v in meta.items() if k != "checksum"}  # as written before checksums existed
    save_file(tensors, str(path), metadata=old)
    with pytest.warns(UserWarning, match="no checksum"):
        loaded, m = load_checkpoint(path)
    assert m["step"] == 4 and loaded.keys() == tensors.keys()


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


def test_unusable_out_dir_fails_before_training(tmp_path, monkeypatch):
    (tmp_path / "afile").write_text("not a folder")

    def no_training(*a, **k):
        raise AssertionError("training started")

    monkeypatch.setattr(train_mod, "_Task", no_training)
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


def test_bad_selection_layers_and_devices_are_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match=r"--selection_layers='a,b'.*comma-separated layer indices"):
        parse_overrides(["--selection_layers=a,b"])
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
    from selective_attention.train import _Task, evaluate

    cfg = TrainConfig(data="pydoc", n_layer=1, d_model=32, n_head=2, context_len=32, batch_size=2, eval_batches=1)
    model = GPT(cfg.model_config())
    for mode in (False, True):
        model.train(mode)
        evaluate(model, _Task(cfg), torch.device("cpu"))
        assert model.training is mode
