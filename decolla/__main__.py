"""`python -m decolla` is the `decolla` command."""
import sys

from decolla.cli import main

sys.exit(main())
