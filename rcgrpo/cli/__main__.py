"""`python -m rcgrpo.cli ...` = `rcgrpo ...`."""
import sys

from . import main

sys.exit(main())
