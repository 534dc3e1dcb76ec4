"""Reliability machinery shared by every dataset and run: skipping bad samples, resumable data
order, atomic checkpoints and non-finite loss handling (see README "Reliability")."""
