"""INT8 calibration: explicit Q/DQ graphs calibrated on good images (``stfpm-edge calibrate``)."""

from .int8 import TARGETS, calibrate_int8, verify_int8

__all__ = ["TARGETS", "calibrate_int8", "verify_int8"]
