"""Coreset selection (seed 003): the scores on hand-made inputs, the per-class selection, the split
file `rsedge train --split` reads, the command; and the seed's backbones in the registry."""
import argparse
import json

import numpy as np
import pytest
import torch

from rsedge.trainer.coreset import (
    CoresetOptions,
    coreset_run,
    coreset_split,
    forgetting_counts,
    prediction_margins,
    select_per_class,
)

T, F = True, False
QUIET = {"workers": 0, "progress": False}


def test_forgetting_events_are_correct_to_incorrect_transitions():
    correct = np.array([
        [T, F, T, F],  # learned, forgotten, learned, forgotten: 2 events
        [F, F, F, F],  # never learned: most forgotten of all
        [T, T, T, T],  # unforgettable: 0
        [F, T, T, T],  # learned late, kept: 0 (incorrect -> correct is no event)
        [T, F, F, T],  # one event, however long it stays forgotten
        [F, T, F, T],  # 1
    ])
    assert forgetting_counts(correct).tolist() == [2, np.inf, 0, 0, 1, 1]


def test_forgetting_counts_only_presentations_that_happened():
    correct = np.array([[T, F, F], [T, T, F], [F, F, F], [F, F, F]])
    presented = np.array([[T, F, T], [T, F, T], [F, F, F], [F, T, F]])
    counts = forgetting_counts(correct, presented)
    # row 0: T then (absent) then F -> one event; row 1: T, F -> one; row 2: never shown -> no evidence;
    # row 3: shown once, wrong -> never learned
    assert counts[0] == 1 and counts[1] == 1 and np.isnan(counts[2]) and counts[3] == np.inf


def test_margins_and_the_lowest_are_kept_per_class():
    probs = np.array([[0.70, 0.20, 0.10],   # 0.50
                      [0.40, 0.35, 0.25],   # 0.05
                      [0.10, 0.45, 0.45],   # 0.00
                      [0.05, 0.90, 0.05],   # 0.85
                      [0.30, 0.60, 0.10]])  # 0.30
    m = prediction_margins(probs)
    assert np.allclose(m, [0.50, 0.05, 0.00, 0.85, 0.30])
    labels = [0, 0, 0, 1, 1]
    assert select_per_class(labels, m, 0.34, seed=0, highest=False).tolist() == [2, 4]  # quotas 1 and 1
    assert select_per_class(labels, m, 0.5, seed=0, highest=False).tolist() == [1, 2, 4]  # quotas 2 and 1


def test_most_forgotten_first_never_learned_first_unscored_last():
    scores = np.array([0, np.inf, 3, np.nan, 1, 3])
    labels = [0] * 6
    assert select_per_class(labels, scores, 0.5, seed=0).tolist() == [1, 2, 5]
    assert set(select_per_class(labels, scores, 5 / 6, seed=0).tolist()) == {0, 1, 2, 4, 5}


def test_every_class_keeps_its_rounded_share_and_at_least_one():
    sizes = {0: 40, 1: 13, 2: 3, 3: 1}
    labels = np.repeat(list(sizes), list(sizes.values()))
    rng = np.random.default_rng(1)
    # round() as --fraction rounds (half to even: 6.5 -> 6), and never below one image
    expected = {0.05: [2, 1, 1, 1], 0.1: [4, 1, 1, 1], 0.5: [20, 6, 2, 1], 1.0: [40, 13, 3, 1]}
    for fraction, counts in expected.items():
        for scores in (None, rng.random(len(labels))):
            kept = select_per_class(labels, scores, fraction, seed=3)
            assert np.bincount(labels[kept], minlength=4).tolist() == counts
            assert len(set(kept.tolist())) == len(kept)


def test_ties_are_broken_by_the_seed():
    labels = [0] * 50
    scores = [1.0] * 50
    a = select_per_class(labels, scores, 0.2, seed=0)
    assert a.tolist() == select_per_class(labels, scores, 0.2, seed=0).tolist()
    assert a.tolist() != select_per_class(labels, scores, 0.2, seed=1).tolist()


def _fake_split(per_class=(20, 7, 2)):
    train = [[f"c{c}/{i}.png", c] for c, n in enumerate(per_class) for i in range(n)]
    return {"format": "rsedge-split/1", "root": "/nowhere", "classes": ["a", "b", "c"], "seed": 0,
            "counts": {"train": len(train), "val": 3, "test": 3}, "skipped": [], "train": train,
            "val": [["v.png", 0]] * 3, "test": [["t.png", 1]] * 3}


def test_random_coreset_is_seeded_and_stratified():
    split = _fake_split()
    one, _ = coreset_split(split, CoresetOptions(method="random", fraction=0.3, seed=4), log=lambda m: None)
    again, _ = coreset_split(split, CoresetOptions(method="random", fraction=0.3, seed=4), log=lambda m: None)
    other, _ = coreset_split(split, CoresetOptions(method="random", fraction=0.3, seed=5), log=lambda m: None)
    assert one["train"] == again["train"] and one["train"] != other["train"]
    assert one["coreset"]["per_class"] == {"a": 6, "b": 2, "c": 1}
    assert one["counts"] == {"train": 9, "val": 3, "test": 3}
    assert one["val"] == split["val"] and one["test"] == split["test"]


def test_options_are_checked_with_one_line_errors():
    with pytest.raises(ValueError, match="--method"):
        CoresetOptions(method="entropy").check()
    with pytest.raises(ValueError, match="fraction"):
        CoresetOptions(fraction=0).check()
    with pytest.raises(ValueError, match="two presentations"):
        CoresetOptions(method="forgetting", proxy_epochs=1).check()


def test_forgetting_coreset_trains_with_split_file(synth_data, tmp_path):
    """A forgetting coreset of the synthetic data: a normal split that `train --split` accepts."""
    from rsedge.trainer.datasets import load_split, make_split
    from rsedge.trainer.run import train_run
    from rsedge.trainer.train import TrainConfig

    logs = []
    record = coreset_run(synth_data, tmp_path / "cs", CoresetOptions(
        method="forgetting", fraction=0.25, proxy_epochs=2, img_size=32, batch_size=32, **QUIET), log=logs.append)
    split = load_split(tmp_path / "cs" / "split.json")
    full = make_split(synth_data, progress=False)  # the split the coreset started from (same seed)
    assert split["val"] == full["val"] and split["test"] == full["test"]
    assert {tuple(i) for i in split["train"]} < {tuple(i) for i in full["train"]}
    before = record["per_class"]["before"]
    assert record["per_class"]["after"] == {c: max(1, round(0.25 * n)) for c, n in before.items()}
    assert split["coreset"]["method"] == "forgetting" and split["coreset"]["proxy_epochs"] == 2
    assert record["proxy"]["model"] == "resnet18" and record["stage"] == "coreset" and "torch" in record["versions"]
    events = record["proxy"]["forgetting_events"]
    assert sum(events.values()) == record["images"]["before"]

    out = train_run(synth_data, "resnet18", tmp_path / "train", img_size=32, split_file=str(tmp_path / "cs" /
                    "split.json"), cfg=TrainConfig(epochs=1, batch_size=16, workers=0), progress=False,
                    log=lambda m: None)
    assert out["split"]["counts"]["train"] == len(split["train"])
    assert json.loads((tmp_path / "train" / "split.json").read_text())["coreset"] == split["coreset"]


def test_existing_run_is_refused_and_split_of_another_folder_too(synth_data, tmp_path):
    opts = CoresetOptions(method="random", fraction=0.5, **QUIET)
    coreset_run(synth_data, tmp_path / "cs", opts, log=lambda m: None)
    with pytest.raises(FileExistsError, match="--exist-ok"):
        coreset_run(synth_data, tmp_path / "cs", opts, log=lambda m: None)
    # a coreset of the coreset, read from the folder it is written to, with --exist-ok
    again = coreset_run(synth_data, tmp_path / "cs", CoresetOptions(
        method="random", fraction=0.5, split_file=str(tmp_path / "cs" / "split.json"), exist_ok=True, **QUIET),
        log=lambda m: None)
    assert again["images"]["before"] == 6 * round(0.5 * 21)
    with pytest.raises(ValueError, match="made for"):
        coreset_run(tmp_path, tmp_path / "cs2", CoresetOptions(split_file=str(tmp_path / "cs" / "split.json"),
                                                               **QUIET), log=lambda m: None)


def _parser():
    from rsedge.cli.coreset_cmd import add_coreset_parser
    from rsedge.cli.options import Formatter

    p = argparse.ArgumentParser(prog="rsedge")
    add_coreset_parser(p.add_subparsers(dest="command"), Formatter)
    return p


def test_cli_help_explains_the_options(capsys):
    with pytest.raises(SystemExit):
        _parser().parse_args(["coreset", "--help"])
    text = capsys.readouterr().out
    for word in ("--method", "--fraction", "--proxy-model", "--proxy-epochs", "--img-size", "--split",
                 "forgetting", "margin", "Toneva", "Settles", "rsedge train --data"):
        assert word in text


def test_cli_margin_coreset_runs(synth_data, tmp_path, capsys):
    out = tmp_path / "cs"
    args = _parser().parse_args(["coreset", "--data", str(synth_data), "--method", "margin", "--fraction", "0.2",
                                 "--proxy-epochs", "1", "--img-size", "32", "--workers", "0", "--quiet",
                                 "--out", str(out)])
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert f"--split {out / 'split.json'}" in printed
    record = json.loads((out / "record.json").read_text())
    assert record["method"] == "margin" and record["proxy"]["epochs"] == 1
    assert 0 <= record["proxy"]["margin_mean"] <= 1
    assert record["per_class"]["after"] == {c: round(0.2 * n) for c, n in record["per_class"]["before"].items()}


# -- the seed's backbones -----------------------------------------------------------------------------

@pytest.mark.parametrize("name,head", [("swin_t", "head"), ("efficientnet_v2_s", "classifier.1"),
                                       ("regnet_y_3_2gf", "fc")])
def test_seed_backbones_build_and_classify_64px(name, head):
    from rsedge.trainer.models import create_model, get_spec, head_modules

    assert get_spec(name).head == (head,)
    torch.manual_seed(0)
    model = create_model(name, 10).eval()
    (layer,) = head_modules(model)
    assert layer.out_features == 10
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 10)


def test_regnet_builds_on_meta_as_torchvision_builds_it():
    """Its block widths are computed on the CPU, so `rsedge models` can count it on the meta device,
    and it is torchvision's network (same state-dict names and shapes: torchvision weights load)."""
    import torchvision.models as tvm

    from rsedge.compress.counting import architecture_counts
    from rsedge.trainer.models import create_model

    assert architecture_counts("regnet_y_3_2gf", 10, (64, 64))["params"] > 10_000_000
    with torch.device("meta"):
        ours = create_model("regnet_y_3_2gf", 1000).state_dict()
    reference = tvm.regnet_y_3_2gf().state_dict()  # torchvision's builder fails on meta: on the CPU
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in reference.items()}
