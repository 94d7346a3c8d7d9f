"""Calibration: run real text through the model under Lightning and collect per-unit statistics.

``run.run_calibration`` is the entry; ``methods`` is the capability table (which method runs under
which strategy); ``taylor`` / ``wanda`` / ``baselines`` score units; ``zero3`` runs the same scoring
under DeepSpeed; ``statistics_checkpoint`` saves and resumes what has been accumulated.
"""
