"""Recipe configuration: one strict block per stage, the checks that span them, and how recipes are read.

Nothing here imports a stage module (a test walks the import graph), so reading and checking a recipe is cheap.
"""
