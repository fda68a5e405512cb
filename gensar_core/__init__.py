"""GenSAR: unified generative search and recommendation, as an offline pipeline."""
__version__ = "0.1.0"
