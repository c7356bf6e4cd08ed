"""dps_tune: robust CLIP fine-tuning sweeps."""
__version__ = "0.1.0"
