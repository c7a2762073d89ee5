"""trgl_pipe: module-wise training with the TRGL transport regularization, as a lock-free pipeline."""

__version__ = "0.1.0"
