"""Exit codes of every nmm command, in one place (R17, the Training Operator's convention):
configuration errors are 1–127 and are not retried; retryable faults are 128–255."""

OK = 0
FAILED = 1  # a pipeline run or a cluster request failed
BAD_INPUT = 2  # a spec, a file, a flag, a dataset that cannot be used as given
CONFLICT = 3  # outputs under this run's identity were made from something else
TRACKING_DENIED = 4  # MLflow refused us (credentials, permissions): retrying will not help
STORE_UNAVAILABLE = 129  # the object store cannot be reached or fails: retry
TRACKING_UNAVAILABLE = 130  # MLflow cannot be reached or fails: retry
CLUSTER_UNAVAILABLE = 131  # the Kubernetes API cannot be reached or fails (5xx, 429): retry
PREEMPTED = 143  # SIGTERM (128 + 15) after a checkpoint: the restart resumes


def is_retryable(code: int) -> bool:
    return 128 <= code <= 255
