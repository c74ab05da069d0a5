"""``python -m ptqbench`` is the ``ptqbench`` command."""

import sys

from ptqbench.cli import main

sys.exit(main())
