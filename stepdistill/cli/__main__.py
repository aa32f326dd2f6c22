"""``python -m stepdistill.cli``: the same as the ``stepdistill`` command."""
import sys

from . import main

sys.exit(main())
