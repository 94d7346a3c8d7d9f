"""Data: text sources and their token windows (calibration, evaluation, rank shards)."""
