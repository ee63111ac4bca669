"""The stage skeleton (trainer/stage.py) and the pruning methods' table (compress/methods.py):
run directories of every kind, the model's own split picked in one place, options objects, and
what each pruning method needs, stated once and enforced by both prune_run and the CLI."""
import re
from pathlib import Path

import pytest

from rsedge.trainer.datasets import make_split, save_split
from rsedge.trainer.stage import (
    RUN,
    Stage,
    build_options,
    model_items,
    model_split,
    open_run_dir,
    split_for_model,
)

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def two_folders(tmp_path_factory):
    """Two small image folders with the same classes, and the split of the first one."""
    from rsedge.trainer.synth import make_synthetic_dataset

    root = tmp_path_factory.mktemp("stage")
    a, b = root / "a", root / "b"
    make_synthetic_dataset(a, per_class=4, size=16, seed=0)
    make_synthetic_dataset(b, per_class=3, size=16, seed=1)
    split = make_split(a, seed=0, progress=False)
    save_split(split, root / "split.json")
    meta = {"arch": "resnet18", "classes": split["classes"], "split": str(root / "split.json")}
    return a, b, split, meta


def _touch(folder: Path, names) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for n in names:
        (folder / n).write_text("x")


def test_an_export_folder_is_refused_then_overwritten_whole(tmp_path):
    from rsedge.export.run import EXPORT_DIR

    out = tmp_path / "x"
    _touch(out, ["record.json", "model.onnx", "model_int8_cpu.onnx", "notes.txt"])
    _touch(out / "calib", ["calib_00000.npy"])
    with pytest.raises(FileExistsError) as e:
        open_run_dir(out, kind=EXPORT_DIR)
    msg = str(e.value)
    assert "already holds an export (calib, model.onnx, model_int8_cpu.onnx, record.json)" in msg
    assert "--exist-ok" in msg and "--resume" not in msg  # an export cannot be resumed
    with pytest.raises(FileExistsError):
        open_run_dir(out, resume=True, kind=EXPORT_DIR)
    logs = []
    assert open_run_dir(out, exist_ok=True, log=logs.append, kind=EXPORT_DIR) == out
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"] and logs == []


def test_a_run_folder_resumes_untouched_and_is_overwritten_with_its_split(tmp_path):
    out = tmp_path / "run"
    _touch(out, ["checkpoint.safetensors", "split.json", "notes.txt"])
    assert open_run_dir(out, resume=True) == out
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.safetensors", "notes.txt", "split.json"]
    logs = []
    open_run_dir(out, exist_ok=True, log=logs.append, kind=RUN)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    assert logs == [f"--exist-ok: removed the previous run's checkpoint.safetensors, split.json from {out}"]
    _touch(out, ["split.json"])  # a split alone is no run: kept, and reused by the next stage
    assert open_run_dir(out, exist_ok=True, log=logs.append) == out and (out / "split.json").is_file()


def test_a_finished_run_is_returned_on_resume_and_nothing_is_redone(tmp_path):
    out = tmp_path / "run"
    _touch(out, ["model.safetensors"])
    (out / "record.json").write_text('{"stage": "train", "test": {"top1": 0.5}}')
    logs = []
    stage = Stage("train", out, resume=True, log=logs.append)
    assert stage.finished("training already finished") == {"stage": "train", "test": {"top1": 0.5}}
    assert logs == [f"{out / 'model.safetensors'} exists: training already finished"]
    assert Stage("train", tmp_path / "new", log=logs.append).finished("x") is None


def test_the_model_split_applies_to_its_own_folder_only(two_folders, tmp_path):
    a, b, split, meta = two_folders
    assert model_split(meta) == split and model_split(meta, a) == split
    assert model_split(meta, b) is None
    assert model_split({**meta, "split": str(tmp_path / "gone.json")}) is None
    assert model_split({k: v for k, v in meta.items() if k != "split"}, a) is None


def test_a_later_stage_reuses_the_split_on_the_same_folder_and_makes_one_elsewhere(two_folders, tmp_path):
    a, b, split, meta = two_folders
    logs = []
    same = split_for_model(meta, a, tmp_path / "same", log=logs.append, progress=False)
    assert same["test"] == split["test"] and logs == []
    assert (tmp_path / "same" / "split.json").is_file()  # where the stage after this one finds it
    other = split_for_model(meta, b, tmp_path / "other", log=logs.append, progress=False)
    assert other["root"] == str(b.resolve()) and logs == [f"{b} is not the folder the model was trained on: "
                                                          "making a new split"]


def test_images_come_from_the_model_split_or_every_readable_image_of_another_folder(two_folders):
    a, b, split, meta = two_folders
    root, items = model_items(meta, None, "val")
    assert root == a.resolve() and items == split["val"]
    assert model_items(meta, a, "train")[1] == split["train"]
    (b / split["classes"][0] / "broken.png").write_bytes(b"not an image")
    root, items = model_items(meta, b, "val")
    assert root == b.resolve() and len(items) == 3 * len(split["classes"])  # every image but the broken one
    assert model_items({k: v for k, v in meta.items() if k != "split"}, None, "val") is None


def test_options_objects_take_named_fields_and_refuse_unknown_ones():
    from rsedge.compress.prune import PruneOptions

    given = PruneOptions(method="l1", ratio=0.3)
    o = build_options(PruneOptions, given, {"exist_ok": True})
    assert (o.method, o.ratio, o.exist_ok) == ("l1", 0.3, True) and given.exist_ok is False
    assert build_options(PruneOptions, None, {}) == PruneOptions()
    with pytest.raises(TypeError, match="unknown PruneOptions field.*ratoi"):
        build_options(PruneOptions, None, {"ratoi": 0.5})


def test_what_a_pruning_method_needs_is_enforced_from_its_spec():
    from rsedge.compress.methods import METHOD_SPECS, THRESHOLD_METHODS
    from rsedge.compress.prune import PruneOptions

    quiet = []
    for name, spec in METHOD_SPECS.items():
        if spec.data:
            with pytest.raises(ValueError, match=f"--method {name} needs --data DIR"):
                PruneOptions(method=name).checked(quiet.append)
        else:
            assert PruneOptions(method=name).checked(quiet.append).ratio == 0.5
        if spec.threshold:
            o = PruneOptions(method=name, threshold=0.1).checked(quiet.append)
            assert o.ratio is None and o.threshold == 0.1
        else:
            wanted = re.escape(f"need a threshold method ({', '.join(THRESHOLD_METHODS)})")
            with pytest.raises(ValueError, match=wanted):
                PruneOptions(method=name, threshold=0.1, data="d").checked(quiet.append)
        o = PruneOptions(method=name, data="d").checked(quiet.append)
        assert o.global_pruning is spec.global_only
    assert THRESHOLD_METHODS == ("bn-scale", "l1rr")
    from rsedge.compress.prune import DATA_SCORERS

    assert set(DATA_SCORERS) == {n for n, s in METHOD_SPECS.items() if s.data}  # each data method is measured
    assert quiet == ["l1rr cuts every layer at one gamma threshold: the ratio is applied globally"] * 2


def test_the_cli_offers_and_explains_the_methods_of_the_table():
    from rsedge.cli.compress_cmds import PRUNE_METHODS_HELP
    from rsedge.cli.main import build_parser
    from rsedge.compress.methods import METHOD_SPECS

    parser = build_parser()
    prune = next(a for a in parser._subparsers._actions if a.choices and "prune" in a.choices).choices["prune"]
    method = next(a for a in prune._actions if a.dest == "method")
    assert tuple(method.choices) == tuple(METHOD_SPECS)
    for name, spec in METHOD_SPECS.items():
        line = next(x for x in PRUNE_METHODS_HELP.splitlines() if x.startswith(f"  {name} "))
        assert spec.summary in line and ("needs --data" in line) is spec.data
    with pytest.raises(SystemExit):
        parser.parse_args(["prune", "--model", "m", "--out", "o", "--method", "no-such-method"])


def test_the_model_split_is_read_in_one_place():
    """Split resolution exists once: no stage reads the metadata's split file itself."""
    pattern = re.compile(r"""meta(?:\.get\(|\[)["']split["']""")
    readers = sorted(str(p.relative_to(ROOT)) for pkg in ("trainer", "compress", "export", "cli")
                     for p in (ROOT / pkg).rglob("*.py") if pattern.search(p.read_text()))
    assert readers == ["trainer/stage.py"]
