"""``python -m dataset_scripts.contribute``."""

import sys

from .cli import main

sys.exit(main())
