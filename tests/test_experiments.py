"""The reproduction's pipeline, end to end on a tiny plan: train, evaluate every KV method on both window
sets, search per-layer budgets, report. Checks the bookkeeping a reader relies on, not the numbers."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def reproduce(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("reproduce", ROOT / "experiments" / "reproduce.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    monkeypatch.setattr(mod, "RESULTS", tmp_path / "results" / "reproduction")
    monkeypatch.setattr(mod, "RUNS_DIR", tmp_path / "runs")
    tiny = dict(data="pydoc", tokenizer="bpe", bpe_vocab_size=300, n_layer=2, n_head=2, d_head=8, d_model=16,
                max_steps=3, warmup_steps=1, eval_interval=3, eval_batches=1, ckpt_interval=3)  # fmt: skip
    monkeypatch.setattr(mod, "BASE", tiny)
    monkeypatch.setattr(mod, "TOKENS_PER_STEP", 32)
    monkeypatch.setattr(mod, "WINDOWS", 2)
    monkeypatch.setattr(mod, "PLAN", {16: (range(2), ["standard", "selective", "standard-h8"])})
    return mod


def test_tiny_plan_runs_and_reports(reproduce):
    for context, variant, seed in reproduce.planned():
        reproduce.run_one(context, variant, seed)
    names = sorted(p.stem for p in reproduce.RESULTS.glob("*.json"))
    assert names == sorted(f"c16-{v}-s{s}" for v in ("standard", "selective", "standard-h8") for s in (0, 1))
    sel = json.loads((reproduce.RESULTS / "c16-selective-s0.json").read_text())
    std = json.loads((reproduce.RESULTS / "c16-standard-s0.json").read_text())
    assert set(std["kv"]) == {"standard + window", "standard + H2O"}
    assert set(sel["kv"]) == {"selective + selective", "selective + window"}
    for entry in (*std["kv"].values(), *sel["kv"].values()):
        assert [c["budget"] for c in entry["curve"]] == [4, 8]
        e = entry["at_standard_loss"]
        if e["budget"] is not None:  # chosen on set 0, at or under the standard's loss there
            chosen = next(c for c in entry["curve"] if c["budget"] == e["budget"])
            assert chosen["search"] <= std["full"]["search"]
            larger = [c["heldout"] for c in entry["curve"] if c["budget"] >= e["budget"]]
            full = (sel if entry in sel["kv"].values() else std)["full"]["heldout"]
            assert e["holds"] == all(x <= std["full"]["heldout"] for x in [*larger, full])
    assert "per_layer_search" in sel
    # a second call resumes: nothing is retrained
    before = (reproduce.RESULTS / "c16-standard-s0.json").stat().st_mtime_ns
    reproduce.run_one(16, "standard", 0)
    assert (reproduce.RESULTS / "c16-standard-s0.json").stat().st_mtime_ns == before
    md = reproduce.report()
    assert "| 16 | selective − standard |" in md and "s0 " in md and "s1 " in md
    assert "| 16 | standard + window |" in md
    if importlib.util.find_spec("matplotlib") is not None:  # the plots: KV curves and loss curves per context
        assert all(
            (reproduce.RESULTS.parent / f).stat().st_size > 0 for f in ("reproduction_kv.png", "reproduction_loss.png")
        )


def test_a_variant_waits_for_its_seeds_standard(reproduce):
    # its KV verdicts are measured against that run's loss: started first, they were never filled in
    with pytest.raises(SystemExit, match=r"c16-standard-s1.*--seeds 1 --only standard"):
        reproduce.run_one(16, "selective", 1)
    assert not list(reproduce.RESULTS.glob("*.json"))  # refused before training: nothing written


def test_the_set_0_choice_needs_every_larger_budget_at_the_target(reproduce):
    std = {"full": {"search": 1.0, "heldout": 1.0}}
    dip = [{"budget": 4, "search": 0.9, "heldout": 0.9}, {"budget": 8, "search": 1.1, "heldout": 1.1}]
    assert reproduce.at_standard_loss(dip, 16, std)["budget"] is None  # 4 dips under, 8 misses: not chosen
    ok = [{"budget": 4, "search": 1.2, "heldout": 0.9}, {"budget": 8, "search": 1.0, "heldout": 1.01}]
    e = reproduce.at_standard_loss(ok, 16, std)
    assert (e["budget"], e["ratio"], e["holds"], e["heldout_loss"]) == (8, 2.0, False, 1.01)


def test_the_set_1_check_needs_every_larger_budget_at_the_target_too(reproduce):
    # c2048-standard-s2's window: 64 dips under on set 1 while 1024 misses there; it used to count as holding
    std = {"full": {"search": 1.0, "heldout": 1.0}}
    curve = [{"budget": 4, "search": 1.0, "heldout": 0.99}, {"budget": 8, "search": 1.0, "heldout": 1.01}]
    full = {"search": 0.9, "heldout": 0.9}
    e = reproduce.at_standard_loss(curve, 16, std, full)
    assert (e["budget"], e["holds"], e["heldout_loss"]) == (4, False, 0.99)
    curve[1]["heldout"] = 1.0
    assert reproduce.at_standard_loss(curve, 16, std, full)["holds"]
    # the model's own full cache above the standard's on set 1: nothing holds there
    assert not reproduce.at_standard_loss(curve, 16, std, {"search": 0.9, "heldout": 1.02})["holds"]


def test_a_verdict_decided_by_the_full_cache_is_as_close_when_it_passes(reproduce):
    """The margin that marks a verdict as within noise (*) counts the model's own full cache whether it misses or
    passes by a hair (it counted it only when it missed); the standard model's own full cache, the target itself,
    never decides."""
    std = {"full": {"search": 1.0, "heldout": 1.0}}
    curve = [{"budget": 4, "search": 0.99, "heldout": 0.99}, {"budget": 8, "search": 0.99, "heldout": 0.99}]
    passes = reproduce.at_standard_loss(curve, 16, std, {"search": 0.99, "heldout": 0.9998})
    misses = reproduce.at_standard_loss(curve, 16, std, {"search": 0.99, "heldout": 1.0002})
    assert passes["holds"] and not misses["holds"]
    assert passes["heldout_margin"] == pytest.approx(-0.0002) and misses["heldout_margin"] == pytest.approx(0.0002)
    own = reproduce.at_standard_loss(curve, 16, std, std["full"])  # the standard model against itself
    assert own["heldout_margin"] == pytest.approx(-0.01)


def test_a_diverged_run_is_left_out_of_the_paired_statistics_by_name(reproduce):
    """A non-finite held-out loss (a diverged run) used to stop the whole report (paired_t refuses it): the pair
    is left out, and the per-seed column says so."""
    reproduce.RESULTS.mkdir(parents=True)
    losses = {("standard", 0): 2.0, ("standard", 1): 2.1, ("standard", 2): 2.2,
              ("selective", 0): 1.9, ("selective", 1): float("nan"), ("selective", 2): 2.05}  # fmt: skip
    for (variant, seed), loss in losses.items():
        r = {"name": f"c16-{variant}-s{seed}", "context": 16, "variant": variant, "seed": seed,
             "config": dataclasses.asdict(reproduce.config(16, variant, seed)),
             "full": {"search": loss, "heldout": loss}, "kv": {}}  # fmt: skip
        (reproduce.RESULTS / f"{r['name']}.json").write_text(json.dumps(r))
    md = reproduce.report()
    row = next(line for line in md.splitlines() if line.startswith("| 16 | selective − standard |"))
    assert "(n=2)" in row and "s1 not finite (left out)" in row and "s0 -0.1000" in row and "s2 -0.1500" in row


def test_a_result_made_with_another_config_is_not_taken_for_this_ones(reproduce, monkeypatch, capsys):
    """run trained nothing and plan said 'done' for a file made before an edit of BASE, and the report paired it with
    the others; a file made with this config (a field added to the code since counts as its default) is reused."""
    reproduce.RESULTS.mkdir(parents=True)
    for variant in ("standard", "selective"):
        cfg = dataclasses.asdict(reproduce.config(16, variant, 0))
        cfg.pop("compile")  # written before the field existed: its default
        cfg["out_dir"] = "/elsewhere"  # where it ran is not what it trained
        r = {"name": f"c16-{variant}-s0", "context": 16, "variant": variant, "seed": 0, "config": cfg,
             "full": {"search": 2.0, "heldout": 2.0}, "kv": {}}  # fmt: skip
        (reproduce.RESULTS / f"{r['name']}.json").write_text(json.dumps(r))
    assert reproduce.run_one(16, "standard", 0)["name"] == "c16-standard-s0"  # reused, nothing trained
    assert "| 16 |" in reproduce.report()
    monkeypatch.setattr(reproduce, "BASE", {**reproduce.BASE, "max_steps": 5})  # the script's config changes
    with pytest.raises(SystemExit, match=r"c16-standard-s0.json was made with another config \(max_steps: 3 there, 5"):
        reproduce.run_one(16, "standard", 0)
    with pytest.raises(SystemExit, match="2 result files .* were made with another config"):
        reproduce.report()
    monkeypatch.setattr("sys.argv", ["reproduce.py", "plan", "--seeds", "0"])
    reproduce.main()
    assert "STALE  c16-standard-s0" in capsys.readouterr().out
    assert reproduce.stale({"config": {}, "variant": "renamed", "context": 16, "seed": 0}) == (
        "variant 'renamed' is no longer in VARIANTS"
    )  # was a bare KeyError in plan, report and run


def test_config_changes_count_a_missing_field_as_its_default_and_a_list_as_a_tuple():
    from selective_attention.train import TrainConfig, config_changes

    cfg = TrainConfig.from_options({"selection": True, "selection_layers": (0,), "n_layer": 2, "lr": 1e-3})
    stored = dataclasses.asdict(cfg)
    stored["model"]["selection_layers"] = [0]  # as JSON keeps it
    del stored["compile"]
    assert config_changes(cfg, stored) == {}
    stored["lr"] = 2e-3
    assert config_changes(cfg, stored) == {"lr": (2e-3, 1e-3)}
    assert config_changes(cfg, stored, ignore=("lr",)) == {}


def test_a_context_or_seed_outside_the_plan_is_refused_not_a_silent_no_op(reproduce, monkeypatch, capsys):
    for argv in (["run", "--contexts", "4096"], ["run", "--seeds", "7"], ["plan", "--contexts", "4096"],
                 ["run", "--contexts", "16", "9999"]):  # fmt: skip
        monkeypatch.setattr("sys.argv", ["reproduce.py", *argv])
        with pytest.raises(SystemExit) as e:
            reproduce.main()
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert "nothing planned matches" in err or "are not in the plan (contexts [16])" in err
    assert not reproduce.RESULTS.exists()  # and the report was not rewritten


def test_the_variable_assignment_report_leaves_a_diverged_seed_out_by_name():
    """varassign's final comparison crashed on a diverged run (paired_t refuses a NaN); the pair is left out, its
    seed named, and the means count it as not finite."""
    spec = importlib.util.spec_from_file_location("varassign", ROOT / "experiments" / "varassign.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    std = {s: {"val_loss": v} for s, v in enumerate((2.0, 2.1, 2.2))}
    sel = {s: {"val_loss": v} for s, v in enumerate((1.9, float("nan"), 2.05))}
    text = mod.paired_by_seed([0, 1, 2], sel, std, lambda r: r["val_loss"])
    assert "(n=2)" in text and "per seed: -0.1000, seed 1 not finite (left out), -0.1500" in text
    assert mod.paired_by_seed([1], sel, std, lambda r: r["val_loss"]).startswith("no finite pair")
    assert "1 not finite, left out" in mod.mean_std([r["val_loss"] for r in sel.values()])


def test_varassign_refuses_a_result_made_with_another_config(tmp_path, monkeypatch):
    """run_one returned, and the report paired, a file made before an edit of CONFIGS (a 50-step run beside 7000-step
    ones, one table)."""
    spec = importlib.util.spec_from_file_location("varassign", ROOT / "experiments" / "varassign.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    from selective_attention.train import TrainConfig

    monkeypatch.setattr(mod, "RESULTS", tmp_path)
    name = next(iter(mod.CONFIGS))
    cfg = dataclasses.asdict(TrainConfig.from_options(mod.options(name, "standard", 0)))
    r = {"config": name, "attention": "standard", "seed": 0, "train_config": cfg}
    (tmp_path / f"{mod.run_name(name, 'standard', 0)}.json").write_text(json.dumps(r))
    assert mod.load()[name]["standard"][0]["seed"] == 0
    assert mod.run_one(name, "standard", 0)["seed"] == 0  # reused: nothing trained
    cfg["max_steps"] = cfg["max_steps"] + 1
    (tmp_path / f"{mod.run_name(name, 'standard', 0)}.json").write_text(json.dumps({**r, "train_config": cfg}))
    with pytest.raises(SystemExit, match="made with another config .*max_steps"):
        mod.load()
    with pytest.raises(SystemExit, match="made with another config .*max_steps"):
        mod.run_one(name, "standard", 0)
