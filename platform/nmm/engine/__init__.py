"""The embedded local engine: executes a compiled Argo Workflow on this machine.

It walks the DAG, substitutes parameters, honours `when`, retryStrategy and onExit, reads output
parameters from `valueFrom.path`, and runs each step's container command as a local process
(a PyTorchJob becomes one local process per replica, with the env its pods would get).
"""

from nmm.engine.runner import RunResult, StepResult, run_workflow

__all__ = ["RunResult", "StepResult", "run_workflow"]
