"""Helpers shared by the test suite (no test collection here)."""
