"""moram_bench: continual learning on pre-trained models, MoRAM and baselines, one protocol."""
__version__ = "0.1.0"
