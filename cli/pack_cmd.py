"""`rsedge pack`: an uplink-size .rspack of a model (seed 003), for a device behind a thin radio link."""
from __future__ import annotations

from .options import Formatter

PACK_HELP = """\
recipe (default: adaptive P->Q under --target-cr 8):
  1. prune (P): single weights of every conv / linear layer are zeroed. lap (default): per-layer
     sparsity from a normalized layer importance, less for the important layers (Shinde 2024, as
     the seed cites it), --sparsity of all these weights in total; fixed: one global magnitude
     threshold; --pattern 2:4: two of every four input channels zero (TensorRT's sparse tensor
     cores on Ampere / Orin), 50 % of every eligible layer.
  2. quantize (Q): symmetric integer codes, one scale per output channel, the clipping value
     searched for the least squared error (so 4 bits does not collapse to chance). LAQ (default):
     a width of 2, 3, 4, 5, 6 or 8 bits per layer, the most sensitive layers first, under the bit budget the
     target CR leaves; --bits N: every layer at N bits.
  --order qp quantizes first and prunes the quantized weights. Layer importance and sensitivity
  are the task's loss increase on --calib-images training images when --data is given, else
  data-free (weight statistics).

the pack (OUT/model.rspack): a 48-byte prefix (magic, version, header length, SHA-256 of the
header), a JSON header (the model's metadata, one entry per tensor, the FP32 size it replaces,
the payload's SHA-256) and an xz payload: the ONNX graph, each weight's codes bit-packed at its
width with its float32 scales, pruned weights as a 1-bit mask plus the kept codes only. The
device checks it and unpacks it with numpy only (Python 3.6) into model.onnx + weights.bin; a
truncated or tampered pack is refused by name. `rsedge-bench model.rspack` runs it directly.

CR = FP32 safetensors file size / pack file size, both measured; a pack that misses
--target-cr is compressed again with a smaller budget, and refused if it never reaches it.
With --data the record also holds the task's metric of the FP32 model and of the unpacked pack
(ONNX Runtime) on the model's test split, and the drop in points.

writes OUT/model.rspack and OUT/record.json (options, per-layer sparsity and bits, pack bytes and
measured CR, round-trip error, accuracy, seconds, versions).

examples:
  rsedge pack --model runs/base/model.safetensors --out runs/pack
  rsedge pack --model runs/base/model.safetensors --data data/eurosat --out runs/pack --target-cr 10
  rsedge pack --model runs/base/model.safetensors --out runs/pack4 --method fixed --bits 4
  rsedge pack --model runs/base/model.safetensors --out runs/pack24 --pattern 2:4 --order qp
then, on the device:
  rsedge-bench runs/pack/model.rspack --eval data/eurosat_val
"""


def add_pack_parser(sub, formatter: type = Formatter) -> None:
    p = sub.add_parser("pack", help="uplink-size model pack (.rspack): unstructured pruning + 1-8 bit "
                       "quantization, measured compression ratio", formatter_class=formatter, epilog=PACK_HELP)
    p.add_argument("--model", required=True, help="model file (.safetensors)")
    p.add_argument("--out", required=True, help="folder for model.rspack and record.json")
    p.add_argument("--data", help="the model's data folder: calibration images (loss-based importance) and the "
                   "FP32 vs pack accuracy on its test split; without it the recipe is data-free and no accuracy "
                   "is measured")
    p.add_argument("--exist-ok", action="store_true", help="overwrite a pack already in --out")
    r = p.add_argument_group("recipe")
    r.add_argument("--order", choices=("pq", "qp"), default="pq", help="pq: prune then quantize; qp: the reverse")
    r.add_argument("--method", choices=("lap", "fixed"), default=None,
                   help="pruning: layer-adaptive or one global threshold (default: lap; fixed with --pattern)")
    r.add_argument("--sparsity", type=float, default=0.5, metavar="S",
                   help="fraction of the conv / linear weights zeroed")
    r.add_argument("--pattern", choices=("2:4",), default=None,
                   help="2:4 structured sparsity instead of --sparsity (layers whose input channels are not a "
                   "multiple of 4 stay dense)")
    r.add_argument("--bits", type=int, default=None, metavar="N",
                   help="every layer at N bits (1-8) instead of LAQ widths under --target-cr")
    r.add_argument("--target-cr", type=float, default=None, metavar="CR",
                   help="LAQ: the smallest measured compression ratio to reach (default: 8; not with --bits)")
    r.add_argument("--per-tensor", action="store_true", help="one scale per weight instead of per output channel")
    r.add_argument("--clipping", choices=("mse", "minmax"), default="mse",
                   help="mse: the clipping value with the least squared error; minmax: the largest |w|")
    r.add_argument("--clip-grid", type=int, default=80, metavar="N", help="clipping fractions searched (mse)")
    p.add_argument("--dynamic-batch", action="store_true",
                   help="a dynamic batch axis in the packed ONNX (for a bundle whose engines get batch profiles); "
                   "default: batch 1")
    d = p.add_argument_group("data (with --data)")
    d.add_argument("--calib-images", type=int, default=64, metavar="N",
                   help="training images that measure layer importance")
    d.add_argument("--eval-images", type=int, default=None, metavar="N",
                   help="test images the accuracy is measured on, stratified (default: all)")
    d.add_argument("--batch-size", type=int, default=32, metavar="N", help="images per forward pass")
    p.set_defaults(func=cmd_pack)


def cmd_pack(args) -> int:
    from rsedge.export.pack_run import PackRunOptions, pack_run

    options = PackRunOptions(order=args.order, method=args.method, sparsity=args.sparsity, pattern=args.pattern,
                             bits=args.bits, target_cr=args.target_cr, per_channel=not args.per_tensor,
                             clipping=args.clipping, clip_grid=args.clip_grid, data=args.data,
                             calib_images=args.calib_images, eval_images=args.eval_images,
                             batch_size=args.batch_size, dynamic_batch=args.dynamic_batch, exist_ok=args.exist_ok)
    pack_run(args.model, args.out, options)
    print(f"on the device: rsedge-bench {args.out.rstrip('/')}/model.rspack")
    return 0
