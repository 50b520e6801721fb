"""`python -m rcgrpo ...` = `rcgrpo ...`."""
import sys

from .cli import main

sys.exit(main())
