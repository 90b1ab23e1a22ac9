"""The few exceptions slimformer raises on bad input, each with a message that says what to change.

The CLI turns any `SlimformerError` into a one-screen message and a non-zero exit code; anything
else is a bug and keeps its traceback.
"""


class SlimformerError(Exception):
    """Base class: a problem the user can fix by changing the recipe, the files or the model."""


class RecipeError(SlimformerError):
    """The recipe is malformed or asks for something impossible. Lists every problem at once."""

    def __init__(self, problems: list[str], source: str = "recipe"):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{source} has {len(self.problems)} problem(s):\n{lines}")


class ModelError(SlimformerError):
    """The model cannot be found, loaded or handled (unsupported architecture, pickle weights...)."""


class DataError(SlimformerError):
    """A corpus is missing, too small, or overlaps where it must not."""


class ExportError(SlimformerError):
    """Export to ONNX failed or produced a file that does not match PyTorch."""


class GateError(SlimformerError):
    """Validation ran, and at least one gate from the recipe failed. The run folder is still written."""

    def __init__(self, failures: list[str], run_dir: str):
        self.failures = list(failures)
        self.run_dir = run_dir
        lines = "\n".join(f"  - {f}" for f in self.failures)
        super().__init__(f"{len(self.failures)} validation gate(s) failed (report in {run_dir}):\n{lines}")


class RegistryError(SlimformerError):
    """A registry cannot be reached, refuses the credentials, or lacks the name, version or file asked for."""


class IntegrityError(SlimformerError):
    """A file read from a registry does not hash to the sha256 its version records (truncated or tampered)."""
