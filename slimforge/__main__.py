"""``python -m slimforge`` is ``slimforge``."""

import sys

from slimforge.cli import main

sys.exit(main())
