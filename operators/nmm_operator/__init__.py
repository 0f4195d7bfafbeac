"""The nmm operator (kopf): NMMPipeline → compiled Argo Workflow, and the Workflow's state back
into the pipeline's status. `handlers.py` holds only kopf decorators; `builders.py` and
`status.py` are pure and unit-tested with plain dicts."""
