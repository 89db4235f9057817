"""Errors meant for the user: the CLI prints their message and exits non-zero, without a traceback."""


class StfpmError(Exception):
    """Base class for every error whose message tells the user what went wrong and what to do."""


class DataError(StfpmError):
    """A data folder, image or mask cannot be used."""


class ModelFileError(StfpmError):
    """A checkpoint, ONNX model or engine cannot be opened or does not fit."""


class BackendUnavailable(StfpmError):
    """An optional backend (TensorRT, pycuda, ...) is not installed on this machine."""
