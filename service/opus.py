"""libopus's encoder, called directly: one 20 ms frame in, one Opus packet out.

PyAV's codec context wraps each packet in a ``Packet``, keeps its own frame FIFO and
resampler, and costs ~10 µs a frame beyond libopus's own work; called through ctypes a frame
costs one foreign call (which releases the GIL while libopus encodes). The library is the
libopus PyAV's wheels bundle (the one its libavcodec already loaded), else the system's.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import weakref
from pathlib import Path

import av

__all__ = ["OpusEncoder", "library"]

_APPLICATIONS = {"voip": 2048, "audio": 2049, "lowdelay": 2051}
_OK = 0
_SET_BITRATE = 4002
_SET_VBR = 4006
_SET_COMPLEXITY = 4010
_SET_VBR_CONSTRAINT = 4020
_GET_LOOKAHEAD = 4027
#: The largest packet one frame of one channel can make (RFC 6716 3.2.1).
_MAX_PACKET = 1275


def _bundled() -> list[Path]:
    """The libopus files PyAV's wheel ships: in ``av.libs`` beside the package (auditwheel,
    delvewheel) or in its ``.dylibs`` (delocate)."""
    package = Path(av.__file__).parent
    folders = (package.parent / "av.libs", package / ".dylibs")
    return sorted(
        path
        for folder in folders
        if folder.is_dir()
        for path in folder.glob("*opus*")
        if ".so" in path.name or path.suffix in (".dylib", ".dll")
    )


@functools.cache
def library() -> ctypes.CDLL:
    """Load libopus (once) and declare the encoder calls voxrelay makes."""
    bundled = _bundled()
    path = str(bundled[0]) if bundled else ctypes.util.find_library("opus")
    if path is None:
        raise RuntimeError("libopus not found: neither PyAV's wheel nor the system has it")
    lib = ctypes.CDLL(path)
    lib.opus_encoder_create.argtypes = [
        ctypes.c_int32,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.POINTER(ctypes.c_int),
    ]
    lib.opus_encoder_create.restype = ctypes.c_void_p
    lib.opus_encode.argtypes = [
        ctypes.c_void_p,
        ctypes.c_char_p,
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_int32,
    ]
    lib.opus_encode.restype = ctypes.c_int32
    lib.opus_encoder_destroy.argtypes = [ctypes.c_void_p]
    lib.opus_encoder_destroy.restype = None
    lib.opus_strerror.argtypes = [ctypes.c_int]
    lib.opus_strerror.restype = ctypes.c_char_p
    return lib


def _check(lib: ctypes.CDLL, code: int, what: str) -> int:
    if code < _OK:
        raise RuntimeError(f"libopus {what}: {lib.opus_strerror(code).decode()}")
    return code


class OpusEncoder:
    """One mono stream's libopus encoder state, taking s16le frames of 20 ms.

    ``options`` are ffmpeg's names for libopus's settings: ``application`` (``voip``,
    ``audio``, ``lowdelay``), ``compression_level`` (the complexity, 0–10) and ``vbr``
    (``on`` — unconstrained, the default here as in ffmpeg —, ``off``, ``constrained``).

    Not thread-safe: one call at a time, and never :meth:`close` during an
    :meth:`encode` (the state is freed under it).
    """

    def __init__(self, rate: int, bit_rate: int, options: dict[str, str]) -> None:
        unknown = set(options) - {"application", "compression_level", "vbr"}
        if unknown:
            raise ValueError(f"unknown libopus options: {', '.join(sorted(unknown))}")
        application = options.get("application", "audio")
        if application not in _APPLICATIONS:
            raise ValueError(f"unknown libopus application {application!r}")
        vbr = options.get("vbr", "on")
        if vbr not in ("on", "off", "constrained"):
            raise ValueError(f"unknown libopus vbr mode {vbr!r}")
        lib = library()
        error = ctypes.c_int()
        state = lib.opus_encoder_create(rate, 1, _APPLICATIONS[application], ctypes.byref(error))
        _check(lib, error.value, "encoder_create")
        self._lib = lib
        self._state = ctypes.c_void_p(state)
        self._free = weakref.finalize(self, lib.opus_encoder_destroy, self._state)
        # At exit the process's memory goes anyway; freeing then could race an encode still
        # running in a worker thread.
        self._free.atexit = False
        self._ctl(_SET_BITRATE, bit_rate)
        self._ctl(_SET_COMPLEXITY, int(options.get("compression_level", "10")))
        self._ctl(_SET_VBR, int(vbr != "off"))
        self._ctl(_SET_VBR_CONSTRAINT, int(vbr == "constrained"))
        lookahead = ctypes.c_int32()
        _check(
            lib, lib.opus_encoder_ctl(self._state, _GET_LOOKAHEAD, ctypes.byref(lookahead)), "ctl"
        )
        self.rate = rate
        #: Samples per frame at :attr:`rate`, and the bytes of PCM that make one frame.
        self.frame_samples = rate // 50
        self.frame_bytes = self.frame_samples * 2
        #: Samples at :attr:`rate` the decoder must drop at the start (RFC 7845's pre-skip,
        #: which is counted at 48 kHz).
        self.lookahead = lookahead.value
        self._out = ctypes.create_string_buffer(_MAX_PACKET)

    def _ctl(self, request: int, value: int) -> None:
        code = self._lib.opus_encoder_ctl(self._state, ctypes.c_int(request), ctypes.c_int32(value))
        _check(self._lib, code, f"ctl {request} = {value}")

    def encode(self, frame: bytes) -> bytes:
        """Encode one frame of exactly :attr:`frame_bytes` of s16le PCM into a packet."""
        if not self._free.alive:
            raise RuntimeError("the opus encoder is closed")
        if len(frame) != self.frame_bytes:
            raise ValueError(f"an opus frame is {self.frame_bytes} bytes, not {len(frame)}")
        out = self._out
        size = self._lib.opus_encode(self._state, frame, self.frame_samples, out, _MAX_PACKET)
        return out[: _check(self._lib, size, "encode")]

    def close(self) -> None:
        """Free libopus's state; safe to call twice."""
        self._free()
