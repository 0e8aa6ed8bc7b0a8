"""Tests against real mail software and proxies run next to Bonzo."""
