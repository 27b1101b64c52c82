"""``python -m pathmil`` runs the ``pathmil`` command."""

import sys

from pathmil.cli import main

sys.exit(main())
