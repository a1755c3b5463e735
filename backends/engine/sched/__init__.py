"""Scheduling, in plain Python (no torch): sequences, the paged block manager, the scheduler."""
