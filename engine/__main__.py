"""``deepspeed --module biodistill.engine --config ...``: the module form of launch/train.py."""

import sys

from .cli import main

sys.exit(main())
