"""Measurement: the benchmark, the copy of the original SurgicalSAM's operations it compares against, the
backend comparison and speed report, and the temporal-consistency measures. Nothing that ships imports it."""
