"""Control plane: `python -m supervisor` (also installed as the `trio-shard-gateway` command). Plans shards,
runs one worker process per core, coordinates IDENTIFY, restarts what dies, serves metrics and health.

What embedders import from here: `main` (the command line, returning the exit status), `load_settings`
(every layer resolved, with sources) and `SupervisorError`. Running the supervisor in-process is
`supervisor.app.run_supervisor`.
"""

from .cli import main
from .config import load_settings
from .errors import SupervisorError

__all__ = ["SupervisorError", "load_settings", "main"]
