"""`python3 -m rsedge.runtime.build ONNX -o ENGINE`: the TensorRT engine builder, for devices without `rsedge`."""

import sys

from .trt_build import main_build

sys.exit(main_build(prog="python3 -m rsedge.runtime.build"))
