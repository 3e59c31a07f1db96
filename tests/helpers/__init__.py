"""Helpers shared by the tests: encoded images, a resolver that refuses DNS, loopback HTTP servers.

Imported as ``helpers.<module>`` (the tests folder is on the import path, as for conftest).
"""
