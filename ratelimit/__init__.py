"""The shared REST ratelimit engine and the REST proxy built on it.

Not built yet; see the project's issues.
"""
