"""edgeship host toolkit: optimize, validate, sign and ship models to device fleets.

Importing ``toolkit`` is cheap: TensorFlow and friends load only inside the steps that need them.
"""

__version__ = "0.1.0"
