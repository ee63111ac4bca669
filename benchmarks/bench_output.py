"""Where a benchmark script writes its results, and the help formatter, log and machine facts they share.

A run made to try something must not overwrite the committed results the READMEs quote, so
results go to benchmarks/work/results/ (git-ignored) unless the run says `--commit-results`
(then benchmarks/results/, and `git diff benchmarks/results/` shows what changed).
"""
import time
from pathlib import Path

from rsedge.runtime.helpformat import HelpFormatter

HERE = Path(__file__).resolve().parent
COMMITTED = HERE / "results"
WORK = HERE / "work" / "results"


# The runtime's formatter: '(default: X)' only where there is a meaningful default.
Formatter = HelpFormatter


def add_output_options(parser, flag="--results", what="the result files"):
    parser.add_argument(flag, default=None, metavar="DIR",
                        help=f"folder for {what}; default: benchmarks/work/results/ (git-ignored), or "
                             "benchmarks/results/ with --commit-results")
    parser.add_argument("--commit-results", action="store_true",
                        help="write the results into benchmarks/results/, the committed files the READMEs quote, "
                             "instead of the git-ignored benchmarks/work/results/")


def results_dir(folder, commit):
    """The folder to write into: the one given, else the committed or the work folder."""
    if folder:
        return Path(folder)
    return COMMITTED if commit else WORK


def log(msg: str) -> None:
    """A timestamped progress line (long runs are read in their log files)."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def gpu_name() -> str | None:
    """The CUDA device training would use, for the record (None on a CPU-only machine)."""
    try:
        import torch

        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception:  # noqa: BLE001 - a broken CUDA setup is recorded as no GPU
        return None
