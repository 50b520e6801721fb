"""`python -m rcgrpo.reward_server` (the path SPEC.md names): the reward server of `rcgrpo.rewards.server_cli`."""
import sys

from .rewards.server_cli import main

if __name__ == "__main__":
    sys.exit(main())
