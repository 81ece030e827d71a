"""Built-in plugins: the FeatherFace family and the compression passes.

Each module registers through the same hooks a third-party plugin uses.
"""
