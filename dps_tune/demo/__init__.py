"""The demo: a tiny CLIP pretrained on the synthetic world, and the whole study on it (`make demo`)."""
