"""``python -m bench.chaos --duration 60 --seed 7``: see run.py."""

import sys

from .run import main

sys.exit(main())
