"""`python -m daybreak` (also what `torchrun -m daybreak` runs)."""

import sys

from daybreak.cli import main

sys.exit(main())
