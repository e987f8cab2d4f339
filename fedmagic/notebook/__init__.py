"""fedmagic in Jupyter: the magics, the widgets, the participant panel, the lab bridge.

Drives :mod:`fedmagic.engine`; nothing below imports this package.
"""
