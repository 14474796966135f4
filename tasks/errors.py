"""The pipeline's errors, in one place. Each is a one-line UserError (the CLI prints it, the DAGs
fail the task without retries: waiting does not change a "no")."""

from __future__ import annotations

from onerec.errors import UserError


class StepFailed(UserError):
    """A check that ran and said no (bad data, failed gate, lost file): retrying will not change the answer."""


class ProvenanceError(StepFailed):
    """The version's evidence does not verify: it is not what the pipeline registered (no retry helps)."""


class StateError(StepFailed):
    """A transition the state machine does not allow, or a record that does not verify (no retry helps)."""
