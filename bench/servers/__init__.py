"""Sink servers the benchmark starts: each discards every message it accepts."""
