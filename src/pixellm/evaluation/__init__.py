"""Evaluation: mask matching, the MUSE protocol with its answer judges, and result reports."""
