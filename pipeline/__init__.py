"""slimformer: drop redundant transformer sublayers and ship the result to phones.

The package is a staged pipeline (see `pipeline.stages` for the stage order). Importing it stays
cheap: torch, onnxruntime and optimum are imported inside the functions that need them.
"""

__version__ = "0.1.0"
