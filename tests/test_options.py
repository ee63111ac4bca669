"""Options that must say what they do: learning-rate defaults per optimizer, help text without
meaningless defaults, --version, --debug anywhere, the l1rr default, and every simplifier offered
actually working."""
import argparse
import configparser
import re
from pathlib import Path

import numpy as np
import pytest

from rsedge.cli.main import build_parser, main
from rsedge.cli.options import train_config

REQUIRED = {
    "train": ["--data", "d", "--model", "resnet18", "--out", "o"],
    "finetune": ["--model", "m", "--data", "d", "--out", "o"],
    "sparse-train": ["--model", "m", "--data", "d", "--out", "o"],
}


def _subparsers(parser: argparse.ArgumentParser):
    """Every (name, parser) below `parser`, nested ones included."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield name, sub
                yield from _subparsers(sub)


@pytest.mark.parametrize("command,sgd_lr", [("train", 0.05), ("finetune", 0.01), ("sparse-train", 0.01)])
def test_learning_rate_default_follows_the_optimizer(command, sgd_lr):
    parser = build_parser()
    adamw = parser.parse_args([command, *REQUIRED[command], "--optimizer", "adamw"])
    sgd = parser.parse_args([command, *REQUIRED[command]])
    given = parser.parse_args([command, *REQUIRED[command], "--optimizer", "adamw", "--lr", "0.3"])
    assert train_config(adamw).lr == 1e-3
    assert train_config(sgd).lr == sgd_lr
    assert train_config(given).lr == 0.3


@pytest.mark.parametrize("command", sorted(REQUIRED))
def test_lr_help_states_its_default_once(command):
    sub = dict(_subparsers(build_parser()))[command]
    text = " ".join(sub.format_help().split())
    entry = re.search(r"--lr LR (.*?) --weight-decay", text).group(1)
    assert entry.count("default") == 1 and "0.001 with adamw" in entry


def test_no_help_prints_a_meaningless_default():
    seen = 0
    for name, sub in _subparsers(build_parser()):
        text = " ".join(sub.format_help().split())
        assert "(default: None)" not in text and "(default: False)" not in text, name
        for action in sub._actions:
            if action.required and action.option_strings:
                entry = re.search(re.escape(action.option_strings[0]) + r" \S+ (.*?)(?= --|$)", text)
                assert entry and "default" not in entry.group(1), (name, action.option_strings)
                seen += 1
    assert seen >= 10


def test_zero_defaults_are_shown():
    text = " ".join(dict(_subparsers(build_parser()))["train"].format_help().split())
    assert "linear warm-up epochs (default: 0)" in text


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and re.fullmatch(r"rsedge \d+\.\d+\.\d+\s*", capsys.readouterr().out)


def test_debug_is_accepted_after_the_command(tmp_path, capsys):
    assert main(["models", "--img-size", "32", "--debug"]) == 0
    assert "resnet18" in capsys.readouterr().out
    with pytest.raises(FileNotFoundError):
        main(["prune", "--model", str(tmp_path / "nope.safetensors"), "--out", str(tmp_path / "o"), "--debug"])
    assert main(["prune", "--model", str(tmp_path / "nope.safetensors"), "--out", str(tmp_path / "o")]) == 2


def test_l1rr_without_an_amount_names_its_default(tmp_path, capsys):
    code = main(["prune", "--model", str(tmp_path / "m.safetensors"), "--out", str(tmp_path / "o"),
                 "--method", "l1rr"])
    err = capsys.readouterr().err
    assert code == 2 and "defaults to --target-lfa 0.01" in err and "--ratio" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_ratio_and_budget_together_are_refused(tmp_path, capsys):
    code = main(["prune", "--model", str(tmp_path / "m.safetensors"), "--out", str(tmp_path / "o"),
                 "--ratio", "0.5", "--target-macs", "0.3"])
    assert code == 2 and "not both" in capsys.readouterr().err


def _tiny_onnx(path: Path) -> None:
    """Identity -> Conv -> Add(constant folded from two constants): something to simplify."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w")
    a = numpy_helper.from_array(np.ones((1, 4, 1, 1), np.float32), "a")
    b = numpy_helper.from_array(np.full((1, 4, 1, 1), 2, np.float32), "b")
    nodes = [helper.make_node("Identity", ["input"], ["x1"]),
             helper.make_node("Conv", ["x1", "w"], ["x2"], pads=[1, 1, 1, 1]),
             helper.make_node("Add", ["a", "b"], ["ab"]),
             helper.make_node("Add", ["x2", "ab"], ["x3"]),
             helper.make_node("GlobalAveragePool", ["x3"], ["x4"]),
             helper.make_node("Flatten", ["x4"], ["logits"])]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 4])], [w, a, b])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(path))


def _simplifier_choices() -> list[str]:
    export = dict(_subparsers(build_parser()))["export"]
    return next(a.choices for a in export._actions if "--simplifier" in a.option_strings)


def test_every_offered_simplifier_simplifies(tmp_path):
    from rsedge.export.onnx_export import simplify

    src = tmp_path / "raw.onnx"
    _tiny_onnx(src)
    images = np.random.default_rng(1).standard_normal((2, 3, 8, 8)).astype(np.float32)
    for tool in _simplifier_choices():
        info = simplify(src, tmp_path / f"{tool}.onnx", tool, images, log=lambda m: None)
        if tool != "none":
            assert info["applied"], (tool, info.get("error"))
            assert info["nodes_after"] < info["nodes_before"]


def test_the_host_extra_installs_every_offered_simplifier():
    cfg = configparser.ConfigParser()
    cfg.read(Path(__file__).resolve().parents[1] / "setup.cfg")
    host = {re.split(r"[<>=!~ ]", line.strip())[0] for line in cfg["options.extras_require"]["host"].splitlines()
            if line.strip()}
    assert {t for t in _simplifier_choices() if t != "none"} <= host
