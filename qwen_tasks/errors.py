"""Typed errors. Retryable ones (database, CUDA OOM) are told apart from permanent ones (bad input)."""


class QwenTasksError(Exception):
    """Base class: the CLI prints these as one line, without a traceback."""


class ConfigError(QwenTasksError):
    """A setting or argument that cannot work (bad URL, unknown task, missing path)."""


class DatabaseUnavailable(QwenTasksError):
    """The database cannot be reached or refused us; retryable."""


class StorageUnavailable(QwenTasksError):
    """Object storage cannot be reached (endpoint down, network); retryable, never a verdict on a file."""


class AudioError(QwenTasksError):
    """An audio file that cannot be used; permanent for that file, never for the batch."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


class ModelError(QwenTasksError):
    """A model that cannot be loaded or does not match what the pipeline needs."""


class WrongEnvironment(ModelError):
    """The model needs another Python environment (the original Qwen-Audio: transformers 4.x). Raised
    before any weights load; `python` is that environment's interpreter, `command` the worker to run."""

    def __init__(self, message: str, *, python: str | None = None, command: list[str] | None = None) -> None:
        super().__init__(message)
        self.python = python
        self.command = command or []
