"""``python -m wsfanout.cli``: the ``wsfanout`` command."""

from __future__ import annotations

import sys

from . import main

sys.exit(main())
