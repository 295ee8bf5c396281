"""`python -m sw_lib` runs the `sw-analyze` command line."""
import sys

from .cli import main

sys.exit(main())
