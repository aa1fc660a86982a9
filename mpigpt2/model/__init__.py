"""Pure model math: config, parameter layout, forward/backward ops, a stage, AdamW. Never imports MPI."""
