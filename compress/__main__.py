"""``python -m compress`` runs the ``dqrm-compress`` command line."""

import sys

from compress.cli.main import main

sys.exit(main())
