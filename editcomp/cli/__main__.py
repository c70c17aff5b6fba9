"""``python -m editcomp.cli``."""

import sys

from editcomp.cli import main

sys.exit(main())
