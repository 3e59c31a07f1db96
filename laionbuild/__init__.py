"""laionbuild: an open, faithful and fast rebuild of the LAION-5B dataset-construction pipeline."""

__version__ = "0.1.0"
