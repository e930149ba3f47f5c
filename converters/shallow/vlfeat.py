"""ctypes bindings to VLFeat's ``vl_hog`` and ``vl_dsift`` (Debian package ``libvlfeat1``, 0.9.21).

Used only as the reference the torch modules are tested and benchmarked against; nothing in the
serving path needs VLFeat. Struct layouts follow ``vl/dsift.h`` of VLFeat 0.9.21.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

import numpy as np

VL_HOG_DALAL_TRIGGS = 0
VL_HOG_UOCTTI = 1


class VLFeatUnavailable(RuntimeError):
    """libvl could not be loaded (install Debian's libvlfeat1)."""


class _DsiftGeometry(ctypes.Structure):
    _fields_ = [
        ("numBinT", ctypes.c_int),
        ("numBinX", ctypes.c_int),
        ("numBinY", ctypes.c_int),
        ("binSizeX", ctypes.c_int),
        ("binSizeY", ctypes.c_int),
    ]


class _DsiftFilter(ctypes.Structure):
    _fields_ = [
        ("imWidth", ctypes.c_int),
        ("imHeight", ctypes.c_int),
        ("stepX", ctypes.c_int),
        ("stepY", ctypes.c_int),
        ("boundMinX", ctypes.c_int),
        ("boundMinY", ctypes.c_int),
        ("boundMaxX", ctypes.c_int),
        ("boundMaxY", ctypes.c_int),
        ("geom", _DsiftGeometry),
        ("useFlatWindow", ctypes.c_int),
        ("windowSize", ctypes.c_double),
        ("numFrames", ctypes.c_int),
        ("descrSize", ctypes.c_int),
        ("frames", ctypes.c_void_p),
        ("descrs", ctypes.POINTER(ctypes.c_float)),
        ("numBinAlloc", ctypes.c_int),
        ("numFrameAlloc", ctypes.c_int),
        ("numGradAlloc", ctypes.c_int),
        ("grads", ctypes.c_void_p),
        ("convTmp1", ctypes.c_void_p),
        ("convTmp2", ctypes.c_void_p),
    ]


@functools.lru_cache(maxsize=1)
def library() -> ctypes.CDLL:
    """The loaded libvl, with the prototypes used here declared; raises VLFeatUnavailable."""
    names = [n for n in (ctypes.util.find_library("vl"), "libvl.so.1", "libvl.so") if n]
    errors = []
    for name in names:
        try:
            lib = ctypes.CDLL(name)
            break
        except OSError as exc:
            errors.append(f"{name}: {exc}")
    else:
        raise VLFeatUnavailable(
            "cannot load VLFeat's libvl (apt-get install -y libvlfeat1): " + ("; ".join(errors) or "not found")
        )
    size_t, p = ctypes.c_size_t, ctypes.c_void_p
    fptr = ctypes.POINTER(ctypes.c_float)
    lib.vl_hog_new.restype = p
    lib.vl_hog_new.argtypes = [ctypes.c_int, size_t, ctypes.c_int]
    lib.vl_hog_delete.argtypes = [p]
    lib.vl_hog_set_use_bilinear_orientation_assignments.argtypes = [p, ctypes.c_int]
    lib.vl_hog_put_image.argtypes = [p, fptr, size_t, size_t, size_t, size_t]
    lib.vl_hog_extract.argtypes = [p, fptr]
    for name in ("vl_hog_get_width", "vl_hog_get_height", "vl_hog_get_dimension"):
        getattr(lib, name).restype = size_t
        getattr(lib, name).argtypes = [p]
    lib.vl_dsift_new_basic.restype = ctypes.POINTER(_DsiftFilter)
    lib.vl_dsift_new_basic.argtypes = [ctypes.c_int] * 4
    lib.vl_dsift_delete.argtypes = [ctypes.POINTER(_DsiftFilter)]
    lib.vl_dsift_process.argtypes = [ctypes.POINTER(_DsiftFilter), fptr]
    return lib


def _image(image: np.ndarray) -> np.ndarray:
    image = np.ascontiguousarray(image, dtype=np.float32)
    if image.ndim != 2:
        raise ValueError("expected a 2-D grey image")
    return image


def vl_hog(
    image: np.ndarray,
    cell_size: int = 8,
    num_orientations: int = 9,
    variant: int = VL_HOG_UOCTTI,
    bilinear: bool = False,
) -> np.ndarray:
    """HOG of a grey H×W image as VLFeat computes it: array D×h×w (float32)."""
    lib = library()
    image = _image(image)
    height, width = image.shape
    hog = lib.vl_hog_new(variant, num_orientations, 0)
    try:
        lib.vl_hog_set_use_bilinear_orientation_assignments(hog, int(bilinear))
        lib.vl_hog_put_image(hog, image.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), width, height, 1, cell_size)
        shape = (lib.vl_hog_get_dimension(hog), lib.vl_hog_get_height(hog), lib.vl_hog_get_width(hog))
        out = np.zeros(shape, dtype=np.float32)
        lib.vl_hog_extract(hog, out.ctypes.data_as(ctypes.POINTER(ctypes.c_float)))
    finally:
        lib.vl_hog_delete(hog)
    return out


def vl_dsift(image: np.ndarray, bin_size: int = 8, step: int = 4, window_size: float = 2.0) -> np.ndarray:
    """Dense SIFT of a grey H×W image as ``vl_dsift_process`` computes it (4×4 spatial bins, 8
    orientations, Gaussian window): array 128×fy×fx, descriptor element ``(by·4 + bx)·8 + t``."""
    lib = library()
    image = _image(image)
    height, width = image.shape
    filt = lib.vl_dsift_new_basic(width, height, step, bin_size)
    try:
        filt.contents.windowSize = float(window_size)
        filt.contents.useFlatWindow = 0
        lib.vl_dsift_process(filt, image.ctypes.data_as(ctypes.POINTER(ctypes.c_float)))
        f = filt.contents
        frame = bin_size * (f.geom.numBinX - 1) + 1
        nx = (width - frame) // step + 1
        ny = (height - frame) // step + 1
        if nx * ny != f.numFrames:
            raise RuntimeError(f"unexpected frame count {f.numFrames} (expected {ny}×{nx})")
        flat = np.ctypeslib.as_array(f.descrs, shape=(f.numFrames * f.descrSize,)).copy()
        size = f.descrSize
    finally:
        lib.vl_dsift_delete(filt)
    return flat.reshape(ny, nx, size).transpose(2, 0, 1)
