"""``python -m protoken`` (what ``torchrun -m protoken train ...`` runs)."""

import sys

from protoken.cli import main

sys.exit(main())
