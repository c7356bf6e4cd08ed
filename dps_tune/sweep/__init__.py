"""Sweeps: search spaces, Ray Tune (the only module importing ray), results, the DPS reference, reports."""
