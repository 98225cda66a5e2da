"""The schedule scales with the data, small validation splits are cross-validated against the
linear probe, and scores are calibrated by a temperature the contract carries."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from rich.console import Console
from sklearn.metrics import f1_score

from service.contract import ModelContract, load_and_preprocess
from trainer.calibration import (
    calibration_report,
    carry_to_refit,
    ece_of_a_calibrated_model,
    expected_calibration_error,
    fit_temperature,
    logit_spread,
    probabilities,
)
from trainer.config import TrainConfig, load_config
from trainer.evaluate import evaluate
from trainer.runs import RunDir, load_checkpoint, load_trained
from trainer.train import (
    Selection,
    average_weights,
    average_with_head_phase,
    class_weights,
    decide,
    ema_decay,
    extract_features,
    macro_f1_resampled,
    make_optimizer,
    make_schedule,
    new_model,
    plan_schedule,
    progress_bar,
    train,
    train_head,
)


def config(tmp_path, **knobs) -> TrainConfig:
    return TrainConfig(data=tmp_path, out=tmp_path / "run", **knobs)


@pytest.mark.parametrize("photos, steps", [(249, 200), (3068, 720), (30_000, 720),
                                           (1000, 310)])
def test_default_budget_is_in_steps_with_a_floor_and_a_cap(tmp_path, photos, steps):
    plan = plan_schedule(config(tmp_path), photos)
    assert plan.steps == steps
    assert plan.steps_per_epoch == photos // 32
    assert sum(plan.steps_in(e) for e in range(plan.epochs)) == steps  # ends on the budget
    assert min(8, plan.epochs) <= sum(plan.evaluates_after(e) for e in range(plan.epochs)) <= 12


def test_fixed_epochs_and_explicit_steps_override_the_budget(tmp_path):
    assert plan_schedule(config(tmp_path, epochs=3), 320).steps == 30
    assert plan_schedule(config(tmp_path, epochs=0), 320).steps == 0
    assert plan_schedule(config(tmp_path, steps=55), 320).epochs == 6


def test_warm_up_and_decay_follow_the_step_budget(tmp_path):
    cfg = config(tmp_path, warmup_fraction=0.1)
    model = torch.nn.Linear(2, 2)
    model.head = model  # make_optimizer's two groups: this module is all head
    lrs = []
    schedule = make_schedule(torch.optim.SGD(model.parameters(), lr=1.0), cfg, 200)
    for _ in range(200):
        lrs.append(schedule.get_last_lr()[0])
        schedule.optimizer.step()
        schedule.step()
    assert lrs[0] < 0.1 and max(lrs) == pytest.approx(1.0, abs=0.05)
    assert int(np.argmax(lrs)) == 20 and lrs[-1] < 0.001
    assert make_optimizer  # the fine-tuning optimiser is built by the same module


def test_temperature_recovers_the_truth_and_lowers_ece():
    rng = np.random.default_rng(0)
    true_logits = rng.normal(size=(4000, 5)) * 3
    labels = np.array([rng.choice(5, p=p) for p in probabilities(true_logits)])
    overconfident = true_logits * 2.5  # what a model that is too sure of itself outputs
    assert fit_temperature(overconfident, labels) == pytest.approx(2.5, rel=0.1)
    report = calibration_report(overconfident, labels, "synthetic")
    assert report["ece_after"] < 0.03 < report["ece_before"]
    assert report["nll_after"] < report["nll_before"]
    perfect = probabilities(true_logits)
    assert expected_calibration_error(perfect, labels) < 0.03
    # A perfectly calibrated model still shows some ECE on few photos: the floor says how much.
    slices = [slice(k, k + 300) for k in range(0, 3900, 300)]
    observed = np.mean([expected_calibration_error(perfect[s], labels[s]) for s in slices])
    floor_300 = ece_of_a_calibrated_model(perfect[:300])
    assert observed == pytest.approx(floor_300, rel=0.25)
    assert ece_of_a_calibrated_model(perfect) < floor_300 / 2


def test_temperature_does_not_sharpen_on_held_out_photos_with_no_error():
    # 82 photos, all right with a clear margin: the likelihood alone keeps rising as T falls
    # (the plain fit runs to its 0.05 bound and every score to 1.0); the prior holds it.
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(82, 3))
    labels = rng.integers(0, 3, 82)
    logits[np.arange(82), labels] += rng.uniform(3, 8, 82)
    assert fit_temperature(logits, labels, prior_sd=1e6) < 0.1
    temperature = fit_temperature(logits, labels)
    assert 0.3 < temperature < 1.0
    assert probabilities(logits, temperature).max(1).mean() < 0.995


def test_a_refit_twice_as_sharp_gets_twice_the_temperature():
    rng = np.random.default_rng(2)
    folds = rng.normal(size=(60, 4)) * 3
    refit = 2 * folds + rng.normal(size=(60, 1))  # a per-photo shift: softmax ignores it
    carried = carry_to_refit({"temperature": 0.5, "ece_after": 0.02}, logit_spread(folds),
                             logit_spread(refit))
    assert carried["refit_logit_scale"] == pytest.approx(2.0, rel=1e-3)
    assert carried["temperature"] == pytest.approx(1.0, rel=1e-3)
    assert carried["temperature_out_of_fold"] == 0.5 and carried["ece_after"] == 0.02
    # the refit's calibrated scores are the fold models' calibrated scores
    np.testing.assert_allclose(probabilities(refit, carried["temperature"]),
                               probabilities(folds, 0.5), atol=1e-3)


def train_cv(tiny_folder, tiny_train, folder: Path, evaluated: bool = True, **knobs):
    """The default selection on the tiny set's validation split of 8 photos: 3-fold
    cross-validation, 6 steps per training."""
    tiny = {k: v for k, v in tiny_train.items() if k not in ("selection", "epochs",
                                                              "max_steps_per_epoch")}
    out = folder / "run"
    result = train(TrainConfig(data=tiny_folder, out=out, steps=6, cv_folds=3, **tiny, **knobs))
    if evaluated:
        evaluate(out)
    return out, result


@pytest.fixture(scope="module")
def cv_run(tiny_folder, tiny_train, tmp_path_factory):
    return train_cv(tiny_folder, tiny_train, tmp_path_factory.mktemp("cv"))


@pytest.fixture(scope="module")
def cv_run_probe_wins(tiny_folder, tiny_train, tmp_path_factory):
    """cv_run with a learning rate that wrecks fine-tuning: the probe is chosen and refit."""
    return train_cv(tiny_folder, tiny_train, tmp_path_factory.mktemp("cv-probe"), lr=30.0)[0]


def test_small_validation_is_cross_validated_against_the_probe(cv_run, tiny_folder):
    out, result = cv_run
    selection = json.loads(RunDir(out).selection.read_text())
    assert selection["mode"] == "cv" and "8 validation photos" in selection["reason"]
    assert [f["fold"] for f in selection["folds"]] == [1, 2, 3]
    oof = selection["oof"]
    every_photo = sorted(str(p) for p in tiny_folder.rglob("*.jpg"))
    assert sorted(oof["paths"]) == every_photo  # train+val, each predicted exactly once
    assert sum(f["images"] for f in selection["folds"]) == len(every_photo)
    assert selection["summary"]["chosen"] in ("finetune", "probe")
    assert selection["finetune"] == (selection["summary"]["chosen"] == "finetune")
    # The refit trains on train+val with the fixed schedule: no validation rows to pick from.
    history = json.loads(RunDir(out).history.read_text())
    assert all("val_acc" not in row for row in history)
    phases = [row["phase"] for row in history]
    assert phases[0] == "head" and set(phases[1:]) == ({"finetune"} if selection["finetune"]
                                                       else set())
    assert result.selection["summary"] == selection["summary"]


def test_report_says_what_was_chosen_and_why(cv_run):
    out, _ = cv_run
    metrics = json.loads((out / "report" / "metrics.json").read_text())
    assert metrics["evaluated_on"].startswith("out-of-fold predictions")
    assert metrics["images"] == 40
    card = (out / "report" / "MODEL_CARD.md").read_text()
    summary = json.loads(RunDir(out).selection.read_text())["summary"]
    assert f"**Chosen: {summary['chosen']}.**" in card and summary["why"] in card
    assert "| fold | held-out photos | probe acc | fine-tuned acc |" in card


def out_of_fold_temperature(selection: dict) -> float:
    chosen = selection["summary"]["chosen"]
    return fit_temperature(np.asarray(selection["oof"]["logits"][chosen]),
                           np.asarray(selection["oof"]["labels"]))


def test_a_refit_probe_gets_the_out_of_fold_temperature_scaled_to_its_logits(
        cv_run_probe_wins):
    out = cv_run_probe_wins
    model, contract, checkpoint = load_trained(out)
    fitted = checkpoint["calibration"]
    selection = json.loads(RunDir(out).selection.read_text())
    assert selection["summary"]["chosen"] == "probe"
    assert fitted["temperature_out_of_fold"] == pytest.approx(out_of_fold_temperature(selection),
                                                              abs=1e-4)
    photos = np.stack([load_and_preprocess(Path(p).read_bytes(), contract)
                       for p in selection["oof"]["paths"]])  # train+val, what the refit saw
    with torch.no_grad():
        refit = model(torch.from_numpy(photos)).numpy()
    ratio = logit_spread(refit) / np.mean([fold["probe_logit_spread"]
                                           for fold in selection["folds"]])
    assert fitted["refit_logit_scale"] == pytest.approx(ratio, rel=1e-3)
    assert contract.temperature == pytest.approx(fitted["temperature_out_of_fold"] * ratio,
                                                 rel=1e-3)
    card = (out / "report" / "MODEL_CARD.md").read_text()
    assert f"T {fitted['temperature_out_of_fold']:.3f} out of fold x {ratio:.3f}" in card
    # The evaluation reports the ECE with the uncarried T beside it (here on the same photos).
    metrics = json.loads((out / "report" / "metrics.json").read_text())
    assert metrics["calibration"]["ece_at_temperature_out_of_fold"] == pytest.approx(
        fitted["ece_after"], abs=1e-4)


def test_a_refit_head_is_the_fold_probes_procedure_on_all_of_train_and_val(cv_run_probe_wins):
    """The refit's head phase trains on cross-validation's backbone features, the ones its
    fold probes trained on (photos through the service's preprocessing), not on a second pass
    over the training decode: recomputed here from the files, the same head comes out."""
    out = cv_run_probe_wins
    checkpoint = load_checkpoint(RunDir(out).best)
    selection = json.loads(RunDir(out).selection.read_text())
    run_config = load_config(out)
    contract = ModelContract.model_validate(checkpoint["contract"])
    labels = selection["oof"]["labels"]
    photos = torch.from_numpy(np.stack([load_and_preprocess(Path(p).read_bytes(), contract)
                                        for p in selection["oof"]["paths"]]))
    model = new_model(run_config, len(contract.labels), torch.device("cpu"))
    with progress_bar(Console(quiet=True)) as progress:
        feats = extract_features(model, photos.split(run_config.eval_batch_size), len(photos),
                                 torch.device("cpu"), run_config.channels_last, progress, "")
    train_head(model, feats, torch.tensor(labels), run_config,
               class_weights(run_config, labels, len(contract.labels)), torch.device("cpu"))
    refit = {name: value for name, value in checkpoint["model"].items()
             if name.startswith("head.")}
    assert refit and all(torch.allclose(model.state_dict()[name], value, atol=1e-5)
                         for name, value in refit.items())


def test_a_fine_tuned_refit_keeps_the_out_of_fold_temperature(cv_run):
    out, _ = cv_run
    _, contract, checkpoint = load_trained(out)
    fitted = checkpoint["calibration"]
    selection = json.loads(RunDir(out).selection.read_text())
    assert selection["summary"]["chosen"] == "finetune"
    assert contract.temperature == fitted["temperature"] == pytest.approx(
        out_of_fold_temperature(selection), abs=1e-4)
    assert "refit_logit_scale" not in fitted and "temperature_out_of_fold" not in fitted
    assert "carried to the probe refit" not in (out / "report" / "MODEL_CARD.md").read_text()
    metrics = json.loads((out / "report" / "metrics.json").read_text())
    assert "ece_at_temperature_out_of_fold" not in metrics["calibration"]


def test_temperature_is_fitted_and_carried_by_the_contract(cv_run, tiny_run):
    for run_dir in (cv_run[0], tiny_run):
        _, contract, checkpoint = load_trained(run_dir)
        fitted = checkpoint["calibration"]
        assert contract.temperature == fitted["temperature"] != 1.0
        # NLL is what T minimises (T = 1 is a candidate); ECE on 8 photos is binning noise
        assert fitted["nll_after"] <= fitted["nll_before"] + 1e-6
        card = (run_dir / "report" / "MODEL_CARD.md").read_text()
        assert f"T = **{contract.temperature:.3f}**" in card
        assert "expected calibration error" in card
        metrics = json.loads((run_dir / "report" / "metrics.json").read_text())
        assert metrics["calibration"]["temperature"] == contract.temperature
        floor = metrics["calibration"]["ece_of_a_calibrated_model"]
        assert 0 < floor < 1 and f"would show about {floor:.4f}" in card
        # evaluated on the photos T was fitted on (validation; out of fold): the same T again
        here = metrics["calibration"]["temperature_fitted_here"]
        assert here == pytest.approx(contract.temperature, abs=2e-3)
        assert f"the T these photos alone would fit: {here:.3f} (ECE " in card
        assert metrics["calibration"]["ece_at_temperature_fitted_here"] == pytest.approx(
            metrics["calibration"]["ece_calibrated"], abs=0.01)
    assert load_checkpoint(RunDir(tiny_run).best)["selection"]["mode"] == "val"


# --- WiSE-FT: the fine-tuned weights averaged with the head phase's -------------------------

def test_average_weights_interpolates_floats_and_keeps_counters():
    start = {"w": torch.zeros(3), "bn.num_batches_tracked": torch.tensor(0)}
    tuned = {"w": torch.tensor([2.0, 4.0, -2.0]), "bn.num_batches_tracked": torch.tensor(7)}
    assert torch.equal(average_weights(start, tuned, 0.5)["w"], torch.tensor([1.0, 2.0, -1.0]))
    assert torch.equal(average_weights(start, tuned, 1.0)["w"], tuned["w"])
    assert torch.equal(average_weights(start, tuned, 0.0)["w"], start["w"])
    assert int(average_weights(start, tuned, 0.5)["bn.num_batches_tracked"]) == 7


def _decide(right: dict[str, tuple[int, int]], total: int) -> Selection:
    """Cross-validation's decision on out-of-fold logits for 2 labels where each candidate gets
    photos [first, last) right and the others wrong."""
    labels = np.array([0, 1] * (total // 2))
    photo = np.arange(total)
    oof = {name: np.eye(2)[np.where((first <= photo) & (photo < last), labels, 1 - labels)]
           for name, (first, last) in right.items()}
    return decide(Selection("cv", "test"), [], oof, labels,
                  [type("S", (), {"path": f"{i}.jpg"}) for i in range(total)], 2,
                  0.5 if "wise" in right else None)


@pytest.mark.parametrize("right, total, chosen", [
    ({"probe": (0, 170), "finetune": (0, 200)}, 240, "finetune"),
    ({"probe": (0, 240), "finetune": (0, 100)}, 240, "probe"),        # no resample undoes it
    ({"probe": (0, 140), "wise": (0, 230), "finetune": (0, 200)}, 240, "wise"),
    # 3 photos ahead, on 20 photos only the probe gets right and 17 only fine-tuning does
    ({"probe": (0, 203), "finetune": (20, 220)}, 240, "finetune"),
    ({"probe": (0, 200), "finetune": (40, 240)}, 240, "finetune"),    # a tie
    ({"probe": (0, 200), "wise": (0, 203), "finetune": (20, 220)}, 240, "finetune"),
    ({"probe": (0, 8), "finetune": (3, 10)}, 10, "finetune"),
])
def test_cross_validation_exports_a_simpler_candidate_only_with_a_lead_beyond_noise(
        right, total, chosen):
    picked = _decide(right, total)
    assert picked.summary["chosen"] == chosen
    assert picked.finetune == (chosen != "probe")
    assert picked.wise_alpha == (0.5 if chosen == "wise" else None)
    correct = {name: last - first for name, (first, last) in right.items()}
    for name in right:
        assert picked.summary[name]["acc"] == pytest.approx(correct[name] / total, abs=1e-4)
    leader = max(correct, key=lambda name: (correct[name], name != "finetune"))
    if leader == "finetune":
        assert "resampled" not in picked.summary
    else:  # how often the leader beat fine-tuning over the resamples, and what that decided
        won = picked.summary["resampled"]["won"]
        assert (won >= 0.95) == (chosen == leader)
        assert f"{won:.0%} of 2000 resamples" in picked.summary["why"]


def test_the_resampled_macro_f1_is_sklearns_on_each_resample():
    rng = np.random.default_rng(1)
    labels, predicted = rng.integers(0, 4, 60), rng.integers(0, 4, 60)
    resamples = rng.integers(0, 60, (25, 60))
    expected = [f1_score(labels[r], predicted[r], average="macro", labels=[0, 1, 2, 3],
                         zero_division=0) for r in resamples]
    np.testing.assert_allclose(macro_f1_resampled(labels, predicted, resamples, 4), expected)


@pytest.fixture(scope="module")
def wise_run(tiny_folder, tiny_train, tmp_path_factory):
    """Cross-validation with the WiSE-FT candidate (--wise-alpha 0.5)."""
    return train_cv(tiny_folder, tiny_train, tmp_path_factory.mktemp("wise"), wise_alpha=0.5)


def test_wise_ft_is_a_third_candidate_and_the_export_is_what_was_chosen(wise_run, tmp_path):
    import shutil

    out, result = wise_run
    run = RunDir(out)
    selection = json.loads(run.selection.read_text())
    assert set(selection["oof"]["logits"]) == {"probe", "finetune", "wise"}
    assert all({"probe_acc", "finetune_acc", "wise_acc"} <= set(f) for f in selection["folds"])
    chosen = selection["summary"]["chosen"]
    assert result.selection["summary"]["chosen"] == chosen
    assert selection["wise_alpha"] == (0.5 if chosen == "wise" else None)
    best, last = load_checkpoint(run.best), load_checkpoint(run.last)
    head = load_checkpoint(run.head)["model"]
    averaged = average_weights(head, last["model"], 0.5)
    if chosen == "probe":  # no fine-tuning in the refit: best.pt is the head phase
        assert all(torch.equal(best["model"][k], v) for k, v in head.items())
    else:
        expected = averaged if chosen == "wise" else last["model"]
        assert all(torch.allclose(best["model"][k].float(), v.float()) for k, v in
                   expected.items())
    # Whatever was chosen here, the averaging itself on this run's own checkpoints: best.pt
    # as the refit's last epoch leaves it, averaged once (a resume does not average again).
    copy = RunDir(shutil.copytree(out, tmp_path / "copy"))
    refit = {k: v for k, v in load_checkpoint(copy.best).items() if k != "wise_alpha"}
    torch.save({**refit, "model": last["model"]}, copy.best)
    for _ in range(2):
        average_with_head_phase(copy, 0.5, Console(quiet=True))
        redone = load_checkpoint(copy.best)
        assert redone["wise_alpha"] == 0.5
        assert all(torch.allclose(redone["model"][k].float(), v.float())
                   for k, v in averaged.items())
    card = (out / "report" / "MODEL_CARD.md").read_text()
    assert "| WiSE-FT acc |" in card and selection["summary"]["why"] in card


def test_the_weight_average_spans_a_fraction_of_the_step_budget(tmp_path):
    for steps in (200, 720):
        decay = ema_decay(config(tmp_path, ema_horizon=0.25), steps)
        # after a quarter of the steps a weight from the start counts for 1/e of its share
        assert decay ** (steps / 4) == pytest.approx(np.exp(-1), rel=0.02)
    assert ema_decay(config(tmp_path, ema_horizon=0.001), 200) == 0.0  # never below one step


@pytest.fixture(scope="module")
def ema_run(tiny_folder, tiny_train, tmp_path_factory):
    """cv_run with the weight average on (--ema-horizon 0.5)."""
    return train_cv(tiny_folder, tiny_train, tmp_path_factory.mktemp("ema"), evaluated=False,
                    ema_horizon=0.5)[0]


def test_the_weight_average_is_what_folds_score_and_the_refit_exports(ema_run, cv_run):
    plain = json.loads(RunDir(cv_run[0]).selection.read_text())["folds"]
    averaged = json.loads(RunDir(ema_run).selection.read_text())["folds"]
    for p, a in zip(plain, averaged, strict=True):  # the same photos, seeds and head
        np.testing.assert_allclose(a["logits"]["probe"], p["logits"]["probe"], atol=1e-4)
        assert not np.allclose(a["logits"]["finetune"], p["logits"]["finetune"], atol=1e-3)
    run = RunDir(ema_run)
    best, last = load_checkpoint(run.best), load_checkpoint(run.last)
    assert json.loads(run.selection.read_text())["summary"]["chosen"] == "finetune"
    assert all(torch.equal(best["model"][k], v) for k, v in last["ema"].items())
    trained = [k for k, v in last["model"].items() if v.is_floating_point()
               and not torch.equal(v, last["ema"][k])]
    assert trained  # the raw fine-tuned weights are not what was exported
