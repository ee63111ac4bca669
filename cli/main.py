"""`rsedge`: one command for the host stages, each writing a run directory and `record.json`.

Heavy imports happen inside the sub-commands, so `rsedge --help` is instant and `rsedge bench`
works on a device where only the runtime is installed.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

from .compress_cmds import add_compress_parsers
from .coreset_cmd import add_coreset_parser
from .options import Formatter as _Formatter
from .options import add_fraction_option as _add_fraction_option
from .options import add_training_options as _add_training_options
from .options import train_config as _train_config
from .pack_cmd import add_pack_parser
from .quantize_cmd import add_quantize_parser

EPILOG = """\
typical flow:
  rsedge data synth --out data/synth
  rsedge train    --data data/synth --model resnet18 --img-size 32 --epochs 10 --out runs/base
  rsedge prune    --model runs/base/model.safetensors --method l1 --ratio 0.5 --out runs/pruned
  rsedge finetune --model runs/pruned/model.safetensors --data data/synth --epochs 5 --out runs/ft
  rsedge quantize runs/ft/model.safetensors --out runs/q8   (MSB fixed-point 8-bit weights, seed 002)
  rsedge export   --model runs/ft/model.safetensors --out runs/onnx --int8 --calib-data data/synth
  rsedge bench    runs/onnx/model.onnx runs/onnx/model_int8_cpu.onnx
  rsedge bundle   --model runs/ft/model.safetensors --out bundle --tar   (then on the device: rsedge-bench bundle)
or all of it at once: rsedge demo
"""


TRAIN_EPILOG = """\
examples:
  rsedge train --data data/synth --model resnet18 --img-size 32 --epochs 10 --out runs/base
  rsedge data synth --task segment --out data/scenes
  rsedge train --data data/scenes --model deeplabv3plus_resnet18 --img-size 128 --epochs 20 --out runs/seg
  rsedge train --data "../shared/data/dubai_aerial" --model deeplabv3plus_resnet18 --img-size 256 --out runs/dubai
"""


def _version() -> str:
    from rsedge.runtime import __version__

    return __version__


def cmd_data_synth(args) -> int:
    if args.task == "detect":
        from rsedge.trainer.synth_det import write_synthetic_detection

        n = args.images if args.images is not None else 240
        summary = write_synthetic_detection(args.out, n_images=n, size=args.size or 160, seed=args.seed,
                                            progress=True, exist_ok=args.exist_ok)
        print(f"wrote {n} scenes with {summary['boxes']} boxes ({', '.join(summary['classes'])}; "
              f"{summary['background_images']} background images) to {args.out} in the YOLO txt layout")
        return 0
    if args.task == "segment":
        from rsedge.trainer.synth_seg import write_synthetic_segmentation

        args.images = args.images if args.images is not None else 48
        summary = write_synthetic_segmentation(args.out, n_images=args.images, size=args.size or 128, seed=args.seed,
                                               progress=True, exist_ok=args.exist_ok)
        print(f"wrote {args.images} scenes with masks ({', '.join(summary['classes'])}) to {args.out}")
        return 0
    from rsedge.trainer.synth import make_synthetic_dataset

    args.size = args.size or 64
    counts = make_synthetic_dataset(args.out, per_class=args.per_class, size=args.size, seed=args.seed,
                                    exist_ok=args.exist_ok)
    print(f"wrote {sum(counts.values())} images in {len(counts)} classes to {args.out}: {', '.join(counts)}")
    return 0


def _is_segmentation_data(args) -> bool:
    from rsedge.trainer.datasets import _layout_of

    if any(getattr(args, k, None) for k in ("images", "masks", "colormap")):
        return True
    root = Path(args.data)
    found = _layout_of(root) if root.is_dir() else None
    return found is not None and found[0] == "segmentation"


def _is_detection_data(args) -> bool:
    from rsedge.trainer.datasets import _layout_of

    if getattr(args, "names", None):
        return True
    root = Path(args.data)
    found = _layout_of(root) if root.is_dir() else None
    return found is not None and found[0].startswith("detection")


def _print_detection_split(split: dict) -> None:
    layout, report, boxes = split["layout"], split["report"], split["boxes"]
    print(f"{split['root']}: detection ({layout.get('kind')} layout), {len(split['classes'])} classes, "
          f"{report['images']} images, {boxes['total']} boxes; train {split['counts']['train']}, "
          f"val {split['counts']['val']}, test {split['counts']['test']}; {len(split['skipped'])} unreadable")
    width = max(len(c) for c in split["classes"])
    for name, n in zip(split["classes"], boxes["per_class"]):
        print(f"  {name:<{width}}  {n:6d} boxes")
    bad = {k: report[k] for k in ("class_out_of_range", "degenerate", "clipped", "outside_dropped", "malformed",
                                  "labels_without_image", "background_images") if report.get(k)}
    if bad:
        print("labels: " + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in bad.items()))
        for kind, examples in (report.get("examples") or {}).items():
            for example in examples[:3]:
                print(f"  {kind.replace('_', ' ')}: {example}")
    for note in split.get("notes") or []:
        print(f"note: {note}")


def _print_segmentation_split(split: dict) -> None:
    pixels = split.get("pixels") or {}
    total = pixels.get("total") or 0
    print(f"{split['root']}: segmentation, {len(split['classes'])} classes ({split['layout'].get('mask_kind')} masks"
          f"{', colour map ' + split['layout']['colormap'] if split['layout'].get('colormap') else ''}); images: "
          f"train {split['counts']['train']}, val {split['counts']['val']}, test {split['counts']['test']}"
          f"{' (published split)' if split.get('presplit') else ''}; {len(split['skipped'])} unreadable")
    for i, name in enumerate(split["classes"]):
        share = (pixels.get("per_class") or [0] * len(split["classes"]))[i] / total if total else 0.0
        color = f" {tuple(split['colors'][i])}" if split.get("colors") else ""
        print(f"  {i:3d} {name}{color}: {100 * share:.2f} % of pixels")
    if total:
        print(f"  ignored (unlabelled or a colour in no class): {pixels.get('ignored', 0)} pixels "
              f"({100 * pixels.get('ignored', 0) / total:.2f} %)")
    unmatched = split.get("unmatched") or {}
    if unmatched.get("images") or unmatched.get("masks"):
        print(f"  without a partner: {unmatched['images']} image(s), {unmatched['masks']} mask(s), e.g. "
              f"{', '.join(unmatched.get('examples', [])[:3])}")
    for note in split.get("notes", []):
        print(f"  note: {note}")


def cmd_data_check(args) -> int:
    from rsedge.trainer.datasets import make_split

    if args.fraction < 1 and args.out:
        raise ValueError("--fraction checks a sample of the images: its split is no split to train on, so it "
                         "cannot be written with --out")
    if _is_detection_data(args):
        from rsedge.trainer.detdata import DetLayout, make_detection_split

        split = make_detection_split(args.data, DetLayout(names=args.names), val=args.val, test=args.test,
                                     seed=args.seed)
        _print_detection_split(split)
    elif _is_segmentation_data(args):
        from rsedge.trainer.segdata import SegLayout, make_segmentation_split

        layout = SegLayout(images=args.images, masks=args.masks, colormap=args.colormap)
        split = make_segmentation_split(args.data, layout, val=args.val, test=args.test, seed=args.seed)
        _print_segmentation_split(split)
    else:
        split = make_split(args.data, val=args.val, test=args.test, seed=args.seed, fraction=args.fraction)
        if "sample" in split:
            print(f"--fraction {args.fraction:g}: checked {split['sample']['images']} of {split['sample']['of']} "
                  f"images, stratified by class")
        print(f"{split['root']}: {len(split['classes'])} classes; train {split['counts']['train']}, "
              f"val {split['counts']['val']}, test {split['counts']['test']}; {len(split['skipped'])} unreadable")
    for s in split["skipped"][:20]:
        print(f"  unreadable: {s['path']} ({s['error']})")
    if args.out:
        from rsedge.trainer.datasets import save_split

        save_split(split, os.path.join(args.out, "split.json"))
        print(f"split written to {os.path.join(args.out, 'split.json')}")
    return 0


def cmd_models(args) -> int:
    from .info import models_table

    print(models_table(args.img_size, args.classes))
    return 0


def _task_defaults(args) -> None:
    """--lr and --val where the user gave none: the task's (a detector trains at SGD 0.01 on the
    paper's 80/20 split; classification and segmentation keep a validation part)."""
    from rsedge.trainer.models import get_spec
    from rsedge.trainer.tasks import get_task

    task = get_task(get_spec(args.model).task)
    if args.lr is None and task.default_lr:
        args.lr = task.default_lr.get(args.optimizer)
    if args.val is None:
        args.val = 0.0 if task.name == "detection" else 0.1


def cmd_train(args) -> int:
    from rsedge.trainer.run import TrainOptions, train_run

    _task_defaults(args)
    layout = {k: getattr(args, k) for k in ("images", "masks", "colormap", "names") if getattr(args, k)}
    model_args = {k: v for k, v in (("act", args.act), ("anchor_generations", args.anchor_generations)) if v}
    options = TrainOptions(img_size=args.img_size, cfg=_train_config(args), weights=args.weights,
                           partial_weights=args.partial_weights, val=args.val, test=args.test, split_file=args.split,
                           layout=layout or None, overlap=args.overlap, mosaic=args.mosaic,
                           model_args=model_args or None, resume=args.resume, exist_ok=args.exist_ok,
                           progress=not args.quiet)
    train_run(args.data, args.model, args.out, options)
    print(f"model written to {os.path.join(args.out, 'model.safetensors')}")
    return 0


def cmd_eval(args) -> int:
    from rsedge.trainer.run import EvalOptions, eval_run

    eval_run(args.model, args.data, args.out, EvalOptions(part=args.split, batch_size=args.batch_size,
                                                          device=args.device, progress=not args.quiet,
                                                          fraction=args.fraction, seed=args.seed,
                                                          save_predictions=args.save_predictions))
    return 0


def cmd_export(args) -> int:
    from rsedge.export.run import ExportOptions, export_run

    options = ExportOptions(opset=args.opset, dynamic_batch=args.dynamic_batch, simplifier=args.simplifier,
                            data=args.data, int8=args.int8, calib_data=args.calib_data, calib_size=args.calib_size,
                            calib_method=args.calib_method, max_drop=args.max_drop, guard_images=args.guard_images,
                            fraction=args.fraction, nms=args.nms, nms_class_agnostic=args.nms_class_agnostic,
                            exist_ok=args.exist_ok)
    export_run(args.model, args.out, options)
    return 0


def cmd_bundle(args) -> int:
    from rsedge.export.bundle import BundleOptions, bundle_run

    bundle_run(args.model, args.out, BundleOptions(
        data=args.data, calib_size=args.calib_size, calib_method=args.calib_method, eval_size=args.eval_size,
        max_drop=None if args.max_drop < 0 else args.max_drop, opset=args.opset, dynamic_batch=not args.static_batch,
        tar=args.tar, fraction=args.fraction, pack=args.pack))
    print(f"on the device: rsedge-bench {args.out}")
    return 0


def cmd_info(args) -> int:
    from .info import info_json, info_summary

    print(info_json(args.model, args.layout) if args.json else info_summary(args.model, args.layout))
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    run_demo(args.out, fast=args.fast, progress=not args.quiet)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="rsedge",
        description="Remote-sensing models from training to a measured edge engine: "
        "train, prune, fine-tune, export (ONNX, INT8), build (TensorRT) and benchmark.",
        epilog=EPILOG, formatter_class=_Formatter,
    )
    p.add_argument("--debug", action="store_true",
                   help="show the full traceback on errors (also accepted after the command)")
    p.add_argument("--version", action="version", version=f"rsedge {_version()}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    _add_data_parsers(sub)
    _add_model_parsers(sub)
    add_compress_parsers(sub, _Formatter, _add_training_options)
    add_quantize_parser(sub, _Formatter)
    add_coreset_parser(sub, _Formatter)
    add_pack_parser(sub, _Formatter)
    _add_export_parsers(sub)
    _add_tool_parsers(sub)
    return p


def _add_data_parsers(sub) -> None:
    """`rsedge data synth` and `rsedge data check`."""
    d = sub.add_parser("data", help="make or check datasets", formatter_class=_Formatter)
    dsub = d.add_subparsers(dest="data_command", metavar="ACTION")
    s = dsub.add_parser("synth", help="write a synthetic dataset: land-cover classes, or aerial scenes with masks "
                        "(demo and tests)", formatter_class=_Formatter)
    s.add_argument("--out", required=True, help="folder to write into: <class>/<image>.png (classify), or "
                   "images/, masks/ (colour-coded) and class_dict.csv (segment)")
    s.add_argument("--task", choices=("classify", "segment", "detect"), default="classify",
                   help="classify: one folder per land-cover class; segment: scenes of fields, roads, buildings "
                   "and water with their masks; detect: planes, ships and storage tanks on textured ground with "
                   "YOLO txt labels (images/, labels/, data.yaml)")
    s.add_argument("--per-class", type=int, default=100, help="classify: images per class")
    s.add_argument("--images", type=int, default=None, help="segment / detect: number of scenes (default 48 / 240)")
    s.add_argument("--size", type=int, default=None,
                   help="image side in pixels (default: 64 classify, 128 segment, 160 detect)")
    s.add_argument("--seed", type=int, default=0, help="same seed, same images")
    s.add_argument("--exist-ok", action="store_true",
                   help="write into a folder that holds an earlier `data synth` output (its images are deleted "
                   "first); a folder with anything else in it is always refused")
    s.set_defaults(func=cmd_data_synth)
    c = dsub.add_parser("check", help="scan a dataset: classes, split sizes, unreadable files (segmentation: "
                        "pixels per class and ignored pixels)", formatter_class=_Formatter)
    c.add_argument("--data", required=True, help="dataset root: one folder per class, or images and masks (a "
                   "segmentation layout is recognized)")
    c.add_argument("--images", help="segmentation: name of the image folders when not found by convention")
    c.add_argument("--masks", help="segmentation: name of the mask folders when not found by convention")
    c.add_argument("--colormap", help="segmentation: colour map of colour-coded masks (CSV name,r,g,b or JSON)")
    c.add_argument("--names", help="detection, YOLO txt layout: class names (.names file or data.yaml)")
    c.add_argument("--val", type=float, default=0.1, help="validation fraction per class")
    c.add_argument("--test", type=float, default=0.2, help="test fraction per class")
    c.add_argument("--seed", type=int, default=0, help="split seed")
    c.add_argument("--out", help="also write split.json into this run directory")
    _add_fraction_option(c, "the images (a quick look at a large folder; not with --out)")
    c.set_defaults(func=cmd_data_check)


def _add_model_parsers(sub) -> None:
    """`rsedge models`, `rsedge train`, `rsedge eval`."""
    m = sub.add_parser("models", help="list the architectures of the registry with their params and MACs",
                       formatter_class=_Formatter)
    m.add_argument("--img-size", type=int, default=224, help="input side in pixels the MACs are counted at")
    m.add_argument("--classes", type=int, default=10, help="number of classes of the head")
    m.set_defaults(func=cmd_models)

    t = sub.add_parser("train", help="train a classifier or a segmentation model (the architecture says which)",
                       formatter_class=_Formatter, epilog=TRAIN_EPILOG)
    t.add_argument("--data", required=True, help="dataset root: one folder per class (classification), or images "
                   "and masks in parallel folders (segmentation)")
    t.add_argument("--model", required=True, help="architecture name (see `rsedge models`)")
    t.add_argument("--out", required=True, help="run directory")
    t.add_argument("--img-size", type=int, default=64,
                   help="input side in pixels (EuroSAT is 64); segmentation: the window cut from the tiles, a "
                   "multiple of 32")
    seg = t.add_argument_group("segmentation data (later stages reuse them from the model file)")
    seg.add_argument("--images", help="name of the image folders when not found by convention (images, JPEGImages)")
    seg.add_argument("--masks", help="name of the mask folders when not found by convention (masks, labels, "
                     "SegmentationClass)")
    seg.add_argument("--colormap", help="colour map of colour-coded masks: CSV name,r,g,b (class_dict.csv) or JSON; "
                     "default: class_dict.csv at the dataset root; none: masks hold class indices")
    seg.add_argument("--overlap", type=int, default=None,
                     help="pixels shared by neighbouring windows, in training patches and in sliding-window "
                     "evaluation (default: a quarter of --img-size)")
    det = t.add_argument_group("detection (yolo_n, yolo_s; later stages reuse them from the model file)")
    det.add_argument("--names", help="YOLO txt layout: class names, a darknet .names file (one a line) or a data.yaml "
                     "(default: such a file next to the images or at the dataset root)")
    det.add_argument("--act", choices=("silu", "relu"), default=None,
                     help="activation (default silu; relu is the INT8-friendlier one on TensorRT)")
    det.add_argument("--mosaic", type=float, default=0.0, help="probability of a four-image mosaic per training image")
    det.add_argument("--anchor-generations", type=int, default=0,
                     help="genetic refinement of the k-means anchors, in generations (0: k-means only)")
    t.add_argument("--weights", help="initial weights: a local .safetensors or state-dict .pth (never downloaded)")
    t.add_argument("--partial-weights", action="store_true",
                   help="accept --weights of which fewer than 90 %% of the model's tensors (head excluded) load, "
                   "or of which over 10 %% fit no layer (weights of another architecture)")
    t.add_argument("--exist-ok", action="store_true", help="overwrite an existing run directory")
    t.add_argument("--val", type=float, default=None,
                   help="validation fraction per class (default 0.1; detection 0: the paper's 80/20 split)")
    t.add_argument("--test", type=float, default=0.2, help="test fraction per class")
    t.add_argument("--split", help="reuse this split.json instead of making a new split")
    _add_training_options(t, epochs=30)
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="accuracy, per-class accuracy and confusion matrix of a model file",
                       formatter_class=_Formatter)
    e.add_argument("--model", required=True, help="model file (.safetensors written by rsedge)")
    e.add_argument("--data", required=True, help="dataset root")
    e.add_argument("--split", default="auto", choices=("auto", "all", "train", "val", "test"),
                   help="auto: the model's test split if DATA is its training folder, else every image")
    e.add_argument("--out", help="write metrics.json, confusion.png and record.json here")
    e.add_argument("--batch-size", type=int, default=128, help="images per batch")
    e.add_argument("--device", default="auto", help="auto, cpu, cuda")
    e.add_argument("--save-predictions", metavar="DIR",
                   help="detection: write predictions.json (COCO results, original-image pixels) and the "
                   "ground_truth.json they were scored against, for any COCO tool")
    e.add_argument("--quiet", action="store_true", help="no progress bar")
    e.add_argument("--seed", type=int, default=0, help="seed of --fraction")
    _add_fraction_option(e, "the evaluated images")
    e.set_defaults(func=cmd_eval)


def _add_export_parsers(sub) -> None:
    """`rsedge export` and `rsedge bundle`."""
    x = sub.add_parser("export", help="ONNX (+ INT8 Q/DQ) with parity check and metadata", formatter_class=_Formatter)
    x.add_argument("--model", required=True, help="model file to export")
    x.add_argument("--out", required=True,
                   help="output folder (model.onnx, model_int8.onnx, model_int8_cpu.onnx, calib/, record.json)")
    x.add_argument("--opset", type=int, default=13, help="ONNX opset (TensorRT 8.2 on JetPack 4 parses up to 13)")
    x.add_argument("--dynamic-batch", action="store_true", help="dynamic batch dimension instead of batch 1")
    x.add_argument("--simplifier", choices=("onnxslim", "onnxsim", "none"), default="onnxslim",
                   help="graph simplifier (its result is checked; on failure the plain graph is kept)")
    x.add_argument("--data", help="image folder for the parity check (default: the model's own split)")
    x.add_argument("--int8", action="store_true",
                   help="also write INT8 Q/DQ ONNX (static quantization): model_int8.onnx for TensorRT (int8 "
                   "activations) and model_int8_cpu.onnx for ONNX Runtime's CPU kernels (uint8 activations)")
    x.add_argument("--calib-data", help="training data folder to draw calibration images from "
                   "(its training split when it is the model's folder)")
    x.add_argument("--calib-size", type=int, default=512, help="calibration images, stratified by class")
    x.add_argument("--calib-method", choices=("minmax", "entropy", "percentile"), default="minmax",
                   help="activation range calibration")
    x.add_argument("--max-drop", type=float, default=None,
                   help="accuracy guard: keep the most quantization-sensitive layers in float until the INT8 "
                   "drop on the validation split is at most this many points (top-1 counted in whole images; "
                   "mIoU for segmentation; mAP@0.5 for detection); an INT8 file that cannot meet it is not written")
    x.add_argument("--guard-images", type=int, default=1000,
                   help="validation images (stratified) the INT8 accuracy is measured on")
    _add_fraction_option(x, "the training images the INT8 calibration set is drawn from (needs --int8)")
    x.add_argument("--nms", choices=("none", "trt"), default="none",
                   help="detection: trt also writes model_nms_trt.onnx, the graph with TensorRT's EfficientNMS_TRT "
                   "plugin at the model's deployment thresholds (TensorRT >= 8.0 only; model.onnx keeps boxes and "
                   "scores, NMS on the device in numpy)")
    x.add_argument("--nms-class-agnostic", action="store_true",
                   help="with --nms trt: one NMS over all classes (EfficientNMS_TRT reads it from TensorRT 8.6)")
    x.add_argument("--exist-ok", action="store_true", help="overwrite an existing run directory")
    x.set_defaults(func=cmd_export)

    bd = sub.add_parser("bundle", help="deployment bundle: FP32 + INT8 ONNX, calibration and evaluation data, "
                        "manifest", formatter_class=_Formatter)
    bd.add_argument("--model", required=True, help="model file")
    bd.add_argument("--data", help="the model's data folder (default: the folder of the model's own split)")
    bd.add_argument("--out", required=True, help="new folder for the bundle")
    bd.add_argument("--tar", action="store_true", help="also write OUT.tar.gz")
    bd.add_argument("--pack", metavar="FILE", help="carry this .rspack of the model (`rsedge pack`) instead of the "
                    "FP32 and INT8 ONNX files; the device unpacks it, the manifest's transfer says the bytes to send")
    bd.add_argument("--calib-size", type=int, default=512, help="calibration images from the training split")
    bd.add_argument("--calib-method", choices=("minmax", "entropy", "percentile"), default="minmax",
                    help="activation range calibration of the Q/DQ model")
    bd.add_argument("--eval-size", type=int, default=500, help="evaluation images from the test split")
    bd.add_argument("--max-drop", type=float, default=1.0,
                    help="INT8 accuracy guard budget in top-1 points, counted in whole validation images, for the "
                    "TensorRT and the CPU INT8 file each; a file that cannot meet it is left out of the bundle and "
                    "the manifest says why (negative: no guard)")
    bd.add_argument("--opset", type=int, default=13, help="ONNX opset (13 for TensorRT 8.2 / JetPack 4)")
    bd.add_argument("--static-batch", action="store_true",
                    help="batch 1 only (default: dynamic batch, so the device can build batch profiles)")
    _add_fraction_option(bd, "the training images the INT8 calibration set is drawn from (the evaluation set "
                         "stays whole)")
    bd.set_defaults(func=cmd_bundle)


def _add_tool_parsers(sub) -> None:
    """`rsedge bench` and `build` (handed to the runtime), `info`, `demo`."""
    b = sub.add_parser("bench", help="benchmark ONNX models or TensorRT engines (same as rsedge-bench)",
                       add_help=False)
    b.set_defaults(func=None, passthrough="bench")
    bl = sub.add_parser("build", help="build a TensorRT engine from ONNX (needs TensorRT and a GPU)", add_help=False)
    bl.set_defaults(func=None, passthrough="build")

    i = sub.add_parser("info", help="a model file in short: params, MACs, size, pruned layers, history",
                       formatter_class=_Formatter)
    i.add_argument("model", help="model file")
    i.add_argument("--json", action="store_true", help="print the full metadata as JSON instead")
    i.add_argument("--layout", action="store_true",
                   help="every layer whose width changed (with --json: the full pruned channel layout)")
    i.set_defaults(func=cmd_info)

    dm = sub.add_parser("demo", help="the whole path on synthetic data, with a report table",
                        formatter_class=_Formatter)
    dm.add_argument("--out", default="demo_out", help="output folder")
    dm.add_argument("--fast", action="store_true", help="fewer epochs and shorter benchmarks (a smoke test)")
    dm.add_argument("--quiet", action="store_true", help="no progress bars")
    dm.set_defaults(func=cmd_demo)



def _bench_torch_runner(path: str, threads: int | None = None, log=None):
    """`rsedge bench MODEL.safetensors`: the host model as a runtime Runner, for a PyTorch row (the device has none)."""
    from rsedge.export.bundle import preprocess_spec
    from rsedge.runtime.backends.pytorch import TorchRunner
    from rsedge.runtime.errors import RuntimeToolError
    from rsedge.trainer.modelfile import load_model
    from rsedge.trainer.tasks import task_for

    try:
        model, meta = load_model(path)
    except Exception as e:  # noqa: BLE001 - safetensors and torch raise many types for a file that is no model
        raise RuntimeToolError(f"cannot load {path} as an rsedge model file: {e}") from e
    spec = preprocess_spec(meta)
    return TorchRunner(model, (3,) + tuple(spec["input_size"]), device="auto", metadata=spec, threads=threads,
                       model_path=str(path), output_names=task_for(meta).export_outputs(meta))


def _passthrough(name: str, argv: list[str]) -> int:
    if name == "bench":
        from rsedge.runtime.cli import main as bench_main

        return int(bench_main(argv, prog="rsedge bench", model_loader=_bench_torch_runner) or 0)
    from rsedge.runtime.build.trt_build import main_build

    return int(main_build(argv, prog="rsedge build") or 0)


@contextlib.contextmanager
def _no_empty_out_on_failure(out: str | None):
    """A failed command leaves no empty run directory behind: the folders it created for `--out`
    (the folder and any parents that did not exist) are removed when they hold no file."""
    created = []
    p = Path(out).absolute() if out else None
    while p is not None and not p.exists() and p != p.parent:
        created.append(p)
        p = p.parent
    try:
        yield
    except BaseException:
        for d in created:  # the deepest first
            if not d.is_dir() or any(not f.is_dir() for f in d.rglob("*")):
                break
            shutil.rmtree(d)
        raise


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    rest = [a for a in argv if a != "--debug"]
    if rest and rest[0] in ("bench", "build"):
        return _passthrough(rest[0], rest[1:])
    parser = build_parser()
    args = parser.parse_args(rest)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    try:
        with _no_empty_out_on_failure(getattr(args, "out", None)):
            return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        if debug:
            raise
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"rsedge {args.command}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
