"""Spark entry points (prepare, score, evaluate) and the pieces they share."""
