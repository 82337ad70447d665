"""``python -m ood_fast`` = the ``ood-fast`` command line."""

import sys

from .cli import main

sys.exit(main())
