"""Tests of the shared REST ratelimit engine."""
