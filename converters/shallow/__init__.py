"""The paper's shallow representations as differentiable torch modules and as ONNX models.

- ``HogUoctti``: UoCTTI HOG as VLFeat's ``vl_hog`` ("HOG"; ``bilinear=True`` gives "HOGb").
- ``HogDalalTriggs``: Dalal-Triggs HOG as ``skimage.feature.hog``.
- ``DenseSift``: dense SIFT as VLFeat's ``vl_dsift``.
- ``converters.shallow.export``: writes each as an ONNX model served like any upload.
"""

from converters.shallow.dsift import DenseSift
from converters.shallow.hog import HogDalalTriggs, HogUoctti

__all__ = ["DenseSift", "HogDalalTriggs", "HogUoctti"]
