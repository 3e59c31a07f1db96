"""The Ray runner: connecting to a cluster and running the pipeline's phases on it.

Importing this package imports nothing heavy; each module imports Ray when it is used.
"""
