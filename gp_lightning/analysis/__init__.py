"""Analysis: what a run tells its user — diagnosis, reports, plots, and runs compared side by side."""
