"""``python -m safepacs``."""

import sys

from safepacs.cli import main

sys.exit(main())
