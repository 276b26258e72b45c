"""``python -m specdec.training {train,eval-pair}``: the training CLI without installing specdec."""

from __future__ import annotations

import sys

from specdec.training.cli import main

if __name__ == "__main__":
    sys.exit(main())
