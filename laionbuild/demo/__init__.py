"""The embedded demo: a synthetic sample WARC, a loopback image server and a tiny CLIP."""
