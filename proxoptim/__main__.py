"""``python -m proxoptim``: the command-line main job (see proxoptim.experiments.cli)."""

import sys

from proxoptim.experiments.cli import main

sys.exit(main())
