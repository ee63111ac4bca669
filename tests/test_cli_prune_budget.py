"""`prune --target-macs / --target-params` (a budget instead of a ratio) and the |gamma|
distribution a threshold prune shows and records."""
import json

import torch
from torch import nn

from rsedge.cli.main import main


def test_macs_budget_as_a_fraction_is_met_by_the_smallest_ratio(tmp_path, trained):
    from rsedge.compress.prune import prune_run

    report = prune_run(trained, tmp_path, method="l1", target_macs=0.3, log=lambda m: None)
    before, after, budget = report["before"], report["after"], report["budget"]
    assert budget["requested"] == {"macs": int(0.3 * before["macs"])}
    assert after["macs"] <= 0.3 * before["macs"] and budget["achieved"]["macs"] == after["macs"]
    assert budget["achieved_fraction"]["macs"] == after["macs"] / before["macs"]
    # the search stopped at the boundary: a ratio 0.001 below the chosen one (a trial) misses the budget
    lower = [t for t in budget["trials"] if t["ratio"] < budget["ratio"]]
    assert lower and max(lower, key=lambda t: t["ratio"])["macs"] > 0.3 * before["macs"]
    assert budget["ratio"] - max(t["ratio"] for t in lower) <= 1e-3
    rec = json.loads((tmp_path / "record.json").read_text())
    assert rec["budget"]["requested"] == budget["requested"] and rec["parameters"]["target_macs"] == 0.3
    assert rec["parameters"]["ratio"] == budget["ratio"]


def test_absolute_params_budget_from_the_cli(tmp_path, trained, capsys):
    out = tmp_path / "p"
    assert main(["prune", "--model", str(trained), "--out", str(out), "--method", "l1", "--global",
                 "--target-params", "2000000", "--quiet"]) == 0
    rec = json.loads((out / "record.json").read_text())
    assert rec["budget"]["requested"] == {"params": 2_000_000}
    assert rec["after"]["params"] <= 2_000_000 < rec["before"]["params"]
    assert "meets the budget" in capsys.readouterr().out


def test_unreachable_or_empty_budgets_are_one_line_errors(tmp_path, trained, capsys):
    for value, message in (("100", "out of reach"), ("1", "fraction in (0, 1)"), ("1e12", "nothing to prune")):
        code = main(["prune", "--model", str(trained), "--out", str(tmp_path / "o"), "--target-macs", value])
        err = capsys.readouterr().err
        assert code == 2 and message in err and "Traceback" not in err, (value, err)


def test_threshold_on_a_model_never_sparse_trained_warns_and_shows_gamma(tmp_path, trained):
    from rsedge.compress.prune import prune_run
    from rsedge.trainer.modelfile import load_model

    model, _ = load_model(trained)
    gammas = torch.cat([m.weight.detach().abs() for m in model.modules() if isinstance(m, nn.BatchNorm2d)])
    threshold = float(gammas.min()) / 2
    logs = []
    report = prune_run(trained, tmp_path, method="bn-scale", threshold=threshold, log=logs.append)
    text = "\n".join(logs)
    assert "not sparse-trained" in text and "removed no channel" in text and "|gamma| over" in text
    d = report["gamma_distribution"]
    assert d["at_or_below_threshold"] == 0 and d["threshold"] == threshold
    assert gammas.min() <= d["min"] <= d["q01"] <= d["q05"] <= d["q25"] <= d["median"] <= d["max"] <= gammas.max()
    rec = json.loads((tmp_path / "record.json").read_text())
    assert rec["gamma_distribution"] == d and any("not sparse-trained" in w for w in rec["warnings"])
    assert report["after"]["params"] == report["before"]["params"]


def test_threshold_distribution_counts_what_it_removes(tmp_path, trained):
    from rsedge.compress.prune import prune_run

    first = prune_run(trained, tmp_path / "a", method="bn-scale", threshold=1e-9, log=lambda m: None)
    threshold = first["gamma_distribution"]["q25"]
    report = prune_run(trained, tmp_path / "b", method="bn-scale", threshold=threshold, round_to=1,
                       min_channels=1, log=lambda m: None)
    d = report["gamma_distribution"]
    assert d["at_or_below_threshold"] >= 0.25 * d["channels"]
    assert not any("removed no channel" in w for w in report["warnings"])
    assert report["after"]["params"] < report["before"]["params"]
