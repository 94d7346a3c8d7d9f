"""Runtime: what every step stands on — process ranks and launchers, precision, sharding, files, errors, console."""
