"""``python -m fastgen`` is the ``fastgen`` command, for environments whose scripts folder is not on PATH."""

import sys

from fastgen.cli import main

sys.exit(main())
