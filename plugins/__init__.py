"""Bonzo's bundled plugins, installed as the ``bonzo_plugins`` package.

Each is registered in the ``bonzo.plugins`` entry-point group, exactly like a
third-party plugin, and enabled by name in the ``[plugins]`` table.
"""
