"""Importable user components for the tests (``tests/`` is on ``sys.path`` under pytest)."""
