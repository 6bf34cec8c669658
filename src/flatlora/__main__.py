"""``python -m flatlora ...`` (and ``accelerate launch -m flatlora train RECIPE.yaml``): the ``flatlora`` command."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
