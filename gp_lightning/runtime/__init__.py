"""Runtime: what every step stands on — process ranks and launchers, numerics, FSDP sharding and activation
checkpointing, files and run directories, errors, the console, the shared config groups and recipe base."""
