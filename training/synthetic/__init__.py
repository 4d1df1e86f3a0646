"""Procedural pathology data: pyramidal slides and ROI samples, seeded, no downloads."""
