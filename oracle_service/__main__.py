"""``python -m oracle_service [flags]``: the same as ``specdec oracle``."""

from oracle_service.main import main

main()
