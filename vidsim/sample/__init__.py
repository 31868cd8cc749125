"""Generation with a trained DiT and VAE: the engine (`engine.py`) and `vidsim sample` (`command.py`).

The tasks it can run are the registry in vidsim/tasks.py.
"""
