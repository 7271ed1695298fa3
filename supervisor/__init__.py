"""Control plane: `python -m supervisor`. Plans shards, runs one worker process per core, coordinates
IDENTIFY, restarts what dies, serves metrics and health.

Not built yet; see the project's issues.
"""
