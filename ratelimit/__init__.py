"""The shared REST ratelimit engine and the REST proxy built on it (not built yet; see the project's issues)."""
