"""`rsedge quantize`: fixed-point weights (the seed paper's MSB scheme), a smaller model file."""
from __future__ import annotations

import os

from .options import Formatter

QUANTIZE_HELP = """\
msb-fixed (seed 002, section 2.3): per layer (each Conv / Linear weight, and its bias as a tensor
of its own), the binary point of a --bits word (a sign and bits-1 magnitude bits, symmetric range
+-(2^(bits-1) - 1) * 2^-f) is placed by the histogram of the weights' most-significant-bit
positions floor(log2|w|):
  majority  the window of bits-1 bit positions holding the most MSBs (the paper's rule; a tie
            goes to the higher window)
  max       the window topped by the largest weight's MSB (none saturates by over half a step)
  mse       the window with the least squared error
Weights below half a step underflow to 0, weights beyond the range saturate. BatchNorm and other
normalization parameters stay float32. Needs no data and no retraining; prune first, then quantize.

The model file stores the weights as int8 (int16 above 8 bits) with each tensor's exponent, and
loads back as an ordinary float PyTorch model; `rsedge export` writes its ONNX with int8 weight
initializers behind DequantizeLinear (activations stay float).

writes OUT/model.safetensors, OUT/record.json (per tensor: f, window, underflow, saturation,
errors, MSB histogram) and OUT/msb_histograms.png.

examples:
  rsedge quantize runs/ft/model.safetensors --out runs/q8
  rsedge quantize runs/ft/model.safetensors --out runs/q8 --data data/synth    (metrics before/after)
  rsedge quantize runs/ft/model.safetensors --out runs/q6 --bits 6 --window mse
"""


def add_quantize_parser(sub, formatter: type = Formatter) -> None:
    q = sub.add_parser("quantize", help="fixed-point weights: int8 + a power-of-two exponent per layer (MSB rule)",
                       formatter_class=formatter, epilog=QUANTIZE_HELP)
    q.add_argument("model", nargs="?", help="model file to quantize (or --model)")
    q.add_argument("--model", dest="model_option", metavar="MODEL", help="the model file, as the other stages take it")
    q.add_argument("--out", required=True, help="run directory for the quantized model, record.json and the plot")
    q.add_argument("--exist-ok", action="store_true", help="overwrite an existing run directory")
    q.add_argument("--scheme", choices=("msb-fixed",), default="msb-fixed", help="quantization scheme")
    q.add_argument("--bits", type=int, default=8, help="word length, sign included (4 to 16)")
    q.add_argument("--window", choices=("majority", "max", "mse"), default="majority",
                   help="how the binary point is chosen from the MSB histogram (see below)")
    q.add_argument("--float-biases", action="store_true",
                   help="keep Conv / Linear biases float32 (default: quantized, each with its own exponent)")
    q.add_argument("--plot-layers", type=int, default=6,
                   help="layers shown in msb_histograms.png, first to last (0: no plot)")
    ev = q.add_argument_group("evaluation before and after (optional)")
    ev.add_argument("--data", help="dataset root: the model's test split when it is the folder the model was "
                    "trained on, otherwise every image")
    ev.add_argument("--batch-size", type=int, default=64, help="images per batch")
    ev.add_argument("--workers", type=int, default=max(1, min(4, (os.cpu_count() or 2) - 1)),
                    help="data-loading worker processes")
    ev.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    ev.add_argument("--quiet", action="store_true", help="no progress bars")
    q.set_defaults(func=cmd_quantize)


def _model_argument(args) -> str:
    if args.model and args.model_option:
        raise ValueError("give the model file once: as MODEL or as --model, not both")
    model = args.model or args.model_option
    if not model:
        raise ValueError("which model? rsedge quantize MODEL --out DIR")
    return model


def cmd_quantize(args) -> int:
    from rsedge.compress.msb_fixed import QuantizeOptions, format_summary, quantize_run
    from rsedge.trainer.modelfile import read_metadata
    from rsedge.trainer.tasks import task_for

    model = _model_argument(args)
    options = QuantizeOptions(scheme=args.scheme, bits=args.bits, window=args.window, biases=not args.float_biases,
                              data=args.data, batch_size=args.batch_size, workers=args.workers, device=args.device,
                              plot_layers=args.plot_layers, exist_ok=args.exist_ok, progress=not args.quiet)
    result = quantize_run(model, args.out, options)
    print(format_summary(result, task_for(read_metadata(model)).primary_metric))
    print(f"quantized model written to {os.path.join(args.out, 'model.safetensors')}")
    return 0
