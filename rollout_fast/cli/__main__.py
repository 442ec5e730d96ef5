"""``python -m rollout_fast.cli``: the ``rollout-fast`` command."""

import sys

from . import main

sys.exit(main())
