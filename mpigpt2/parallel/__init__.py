"""The parallel runtime: layout and schedules (pure), grid, point-to-point, collectives, ZeRO, waiting."""
