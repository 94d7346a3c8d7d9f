"""Calibration: run real text through the model under Lightning and collect per-unit statistics.

Methods: ``taylor`` and ``taylor_2nd`` (forward+backward, :mod:`.taylor`), ``wanda`` (forward only,
:mod:`.wanda`), and the data-free baselines ``magnitude`` and ``random`` (:mod:`.baselines`).
"""
