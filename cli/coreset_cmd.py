"""`rsedge coreset`: a split whose training part is a coreset (seed 003), for `rsedge train --split`."""
from __future__ import annotations

import os

from .options import Formatter

CORESET_HELP = """\
methods (each class keeps max(1, round(F x its training images)); validation and test unchanged):
  random      a seeded draw per class; no proxy is trained
  forgetting  Toneva et al. 2018: a proxy model trains for --proxy-epochs epochs; every time an
              image is presented, whether the proxy got it right is recorded; a forgetting event
              is right -> wrong between two consecutive presentations; the images with the most
              events are kept (never learned counts as most forgotten; ties in a seeded random
              order). E epochs give at most E // 2 events per image: more epochs rank finer.
  margin      Settles 2009: after the proxy's training, p_top1 - p_top2 of its softmax on every
              training image (no augmentation); the lowest margins (the hesitant images) are kept

The proxy is only a ranker: it trains from scratch with AdamW and the training augmentations of
`rsedge train`, at the data's image size capped to 64 px (--img-size to choose), and is thrown
away. The split is made as `rsedge train` makes it (--val, --test, --seed), or taken from --split.

writes OUT/split.json (an ordinary rsedge split with a "coreset" entry: method, fraction, proxy,
per-class counts) and OUT/record.json (per-class counts before and after, the proxy's summary,
seconds, versions).

examples:
  rsedge coreset --data data/synth --method margin --fraction 0.1 --out runs/cs_margin
  rsedge coreset --data data/eurosat --method forgetting --fraction 0.05 --proxy-epochs 6 --out runs/cs_fgt
  rsedge coreset --data data/synth --method random --fraction 0.1 --split runs/base/split.json --out runs/cs_rand
then:
  rsedge train --data data/synth --split runs/cs_margin/split.json --model resnet18 --img-size 32 --out runs/m10
"""


def add_coreset_parser(sub, formatter: type = Formatter) -> None:
    c = sub.add_parser("coreset", help="choose a fraction of the training images (random, forgetting or margin "
                       "coreset) as a split file for `rsedge train --split`", formatter_class=formatter,
                       epilog=CORESET_HELP)
    c.add_argument("--data", required=True, help="dataset root: one folder per class")
    c.add_argument("--method", required=True, choices=("random", "forgetting", "margin"),
                   help="how the images are chosen (see below)")
    c.add_argument("--fraction", type=float, required=True, metavar="F",
                   help="fraction in (0, 1] of each class's training images to keep")
    c.add_argument("--out", required=True, help="run directory for split.json and record.json")
    c.add_argument("--exist-ok", action="store_true", help="overwrite a coreset already in --out")
    c.add_argument("--split", help="select from this split.json's training part (it must be a split of --data) "
                   "instead of making a new split")
    c.add_argument("--val", type=float, default=0.1, help="validation fraction of a new split")
    c.add_argument("--test", type=float, default=0.2, help="test fraction of a new split")
    c.add_argument("--seed", type=int, default=0,
                   help="seed of a new split, the random draw and tie-break, and the proxy's initialization "
                   "and data order")
    px = c.add_argument_group("proxy model (forgetting and margin)")
    px.add_argument("--proxy-model", default="resnet18", help="registry classifier that scores the images "
                    "(`rsedge models`)")
    px.add_argument("--proxy-epochs", type=int, default=3,
                    help="epochs of proxy training (forgetting: at least 2)")
    px.add_argument("--img-size", type=int, default=None,
                    help="proxy input side in pixels (default: the data's, capped to 64)")
    px.add_argument("--batch-size", type=int, default=64, help="images per proxy step")
    px.add_argument("--lr", type=float, default=1e-3, help="proxy AdamW learning rate (cosine schedule)")
    px.add_argument("--workers", type=int, default=max(1, min(4, (os.cpu_count() or 2) - 1)),
                    help="data-loading worker processes")
    px.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    c.add_argument("--quiet", action="store_true", help="no progress bars")
    c.set_defaults(func=cmd_coreset)


def cmd_coreset(args) -> int:
    from rsedge.trainer.coreset import CoresetOptions, coreset_run

    options = CoresetOptions(method=args.method, fraction=args.fraction, proxy_model=args.proxy_model,
                             proxy_epochs=args.proxy_epochs, img_size=args.img_size, batch_size=args.batch_size,
                             lr=args.lr, seed=args.seed, workers=args.workers, device=args.device,
                             split_file=args.split, val=args.val, test=args.test, exist_ok=args.exist_ok,
                             progress=not args.quiet)
    record = coreset_run(args.data, args.out, options)
    split = os.path.join(args.out, "split.json")
    print(f"coreset split written to {split} ({record['images']['after']} of {record['images']['before']} "
          f"training images)")
    print(f"next: rsedge train --data {args.data} --split {split} --model MODEL --out RUN")
    return 0
