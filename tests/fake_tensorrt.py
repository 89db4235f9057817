"""Fake ``tensorrt`` modules (types.ModuleType, never MagicMock) with the API profiles of 8.6, 10.x, 11.x.

Only what each version has exists; touching anything else raises AttributeError, and the builder
config has __slots__ so that setting a removed attribute (max_workspace_size, ...) fails too.
Every call the builder makes is recorded in ``module.calls``.
"""

import types

import onnx


class _Enum:
    def __init__(self, **members):
        for k, v in members.items():
            setattr(self, k, v)


def make_fake_trt(version: str, dla_cores: int = 0, build_fails: bool = False):
    major = int(version.split(".")[0])
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    trt.calls = []
    trt.float32 = "float32"
    trt.float16 = "float16"
    creation = {"STRONGLY_TYPED": 1} if major >= 9 and major < 11 else {}
    if major < 11:
        creation["EXPLICIT_BATCH"] = 0
    trt.NetworkDefinitionCreationFlag = _Enum(**creation)
    flags = {"GPU_FALLBACK": 10}
    if major < 11:
        flags.update(FP16=11, INT8=12, OBEY_PRECISION_CONSTRAINTS=13)
    trt.BuilderFlag = _Enum(**flags)
    trt.MemoryPoolType = _Enum(WORKSPACE="WORKSPACE")
    trt.DeviceType = _Enum(GPU="GPU", DLA="DLA")

    class Logger:
        WARNING = "WARNING"

        def __init__(self, severity):
            self.severity = severity

    class Layer:
        __slots__ = ("name", "num_outputs", "_precision", "output_types")

        def __init__(self, name):
            self.name, self.num_outputs, self._precision, self.output_types = name, 1, None, {}

        @property
        def precision(self):
            return self._precision

        @precision.setter
        def precision(self, value):
            self._precision = value

        def set_output_type(self, index, dtype):
            self.output_types[index] = dtype

    class Network:
        def __init__(self, flags):
            self.flags = flags
            self.layers = []

        @property
        def num_layers(self):
            return len(self.layers)

        def get_layer(self, i):
            return self.layers[i]

    class OnnxParser:
        def __init__(self, network, logger):
            self.network = network
            self.errors = []

        def parse(self, data):
            trt.calls.append(("parse", len(data)))
            try:
                model = onnx.load_from_string(data)
            except Exception as exc:
                self.errors.append(f"ModelImporter: {exc.__class__.__name__}")
                return False
            self.network.layers = [Layer(n.name) for n in model.graph.node if n.op_type != "Constant"]
            return True

        @property
        def num_errors(self):
            return len(self.errors)

        def get_error(self, i):
            return self.errors[i]

    class TimingCache:
        def __init__(self, data):
            self.data = data

        def serialize(self):
            return b"timing-cache:" + bytes(self.data)

    class Profile:
        def __init__(self):
            self.shapes = {}

        def set_shape(self, name, lo, opt, hi):
            self.shapes[name] = (lo, opt, hi)

    class Config:
        __slots__ = ("flags", "pool", "default_device_type", "DLA_core", "cache", "profiles")

        def __init__(self):
            self.flags, self.pool, self.cache, self.profiles = [], {}, None, []

        def add_optimization_profile(self, profile):
            self.profiles.append(profile)

        def set_flag(self, flag):
            trt.calls.append(("set_flag", flag))
            self.flags.append(flag)

        def set_memory_pool_limit(self, pool, size):
            self.pool[pool] = size

        def create_timing_cache(self, data):
            return TimingCache(data)

        def set_timing_cache(self, cache, ignore_mismatch):
            self.cache = cache

        def get_timing_cache(self):
            return self.cache

    class Builder:
        def __init__(self, logger):
            self.num_DLA_cores = dla_cores

        def create_network(self, flags=0):
            trt.calls.append(("create_network", flags))
            trt.network = Network(flags)
            return trt.network

        def create_optimization_profile(self):
            return Profile()

        def create_builder_config(self):
            trt.config = Config()
            return trt.config

        def build_serialized_network(self, network, config):
            trt.calls.append(("build_serialized_network",))
            return None if build_fails else b"ENGINE" + version.encode()

    trt.Logger, trt.Builder, trt.OnnxParser = Logger, Builder, OnnxParser
    return trt
