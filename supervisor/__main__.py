"""`python -m supervisor`: see `supervisor.cli`."""

from .cli import main

raise SystemExit(main())
