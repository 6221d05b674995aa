"""``python -m modeling COMMAND [args]``: the library's commands (modeling/cli.py)."""

from modeling.cli import main

raise SystemExit(main())
