"""Evaluation: suites per task category, independent judges, gates."""
