"""`python -m bench [SECTION ...] [options]` runs bench sections; `python -m bench gpu-check --out DIR` runs every
GPU measurement of the benchmarks page in one go; `python -m bench gpu-suite --out DIR` runs the whole suite on CUDA
with ViT-L checkpoints per dtype (both: `--small`, tiny sizes, on the CPU)."""

import sys

if len(sys.argv) > 1 and sys.argv[1] == "gpu-check":
    from .gpu_check import main

    sys.exit(main(sys.argv[2:]))
if len(sys.argv) > 1 and sys.argv[1] == "gpu-suite":
    from .gpu_suite import main

    sys.exit(main(sys.argv[2:]))
from .runner import main

sys.exit(main(sys.argv[1:]))
