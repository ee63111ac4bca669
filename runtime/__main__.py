"""`python -m rsedge.runtime` is `rsedge-bench`, for devices where the console script is not on PATH."""

import sys

from .cli import main

sys.exit(main())
