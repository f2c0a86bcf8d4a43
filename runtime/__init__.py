"""Code shared by every tokenrelay process: wire protocol, configuration files, logging, process trees.

Imports no event loop and creates no socket at import time.
"""
__version__ = "0.1.0"
