"""Interop tests: real daemons (HAProxy, ...) started and stopped by each test
in a temporary directory, listening on 127.0.0.0/8 only. Not run on the
secondary Pythons (.ci/run ignores this directory there)."""
