"""`python -m rcgrpo.train ...` = `rcgrpo train ...`; what `accelerate launch -m rcgrpo.train` and
`torchrun -m rcgrpo.train` run on every process."""
import sys

from ..cli import main

sys.exit(main(["train", *sys.argv[1:]]))
