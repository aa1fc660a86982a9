"""Process basics every layer may use: user errors and exit codes, malloc tuning, the CPU's name."""
