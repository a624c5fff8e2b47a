"""``python -m compress`` runs the ``dqrm-compress`` command line."""

import sys

from compress.cli import main

sys.exit(main())
