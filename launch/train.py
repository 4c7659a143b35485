"""What the deepspeed launcher runs: ``deepspeed [--num_gpus N] launch/train.py --config configs/<recipe>.yaml``.

Also runs as a plain ``python launch/train.py ...`` (a world of one) and under ``mpirun`` (ranks found
through mpi4py). The whole program lives in biodistill.engine; this file only hands over to it.
"""

import sys

from biodistill.engine.cli import main

if __name__ == "__main__":
    sys.exit(main())
