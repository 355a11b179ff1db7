"""Datasets and datamodules shared by the projects.

Names are imported on first use so that `common.data.toy_world` or `common.data.images` (used in DataLoader
workers and the toy-world generator's processes) do not pay for importing Lightning.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from common.data.captioned import CaptionedDataset, CaptionedParts, CaptionedSample, collate_captioned
    from common.data.images import IMAGE_EXTENSIONS, ImageDecodeError, SkipLog, load_rgb
    from common.data.realfake import RealFakeDataset, RealFakeFolder, collate_skipping
    from common.data.samples import DatasetLayoutError, Sample, index_source

_EXPORTS = {
    "CaptionedDataset": "captioned",
    "CaptionedParts": "captioned",
    "CaptionedSample": "captioned",
    "collate_captioned": "captioned",
    "IMAGE_EXTENSIONS": "images",
    "ImageDecodeError": "images",
    "SkipLog": "images",
    "load_rgb": "images",
    "RealFakeDataset": "realfake",
    "RealFakeFolder": "realfake",
    "collate_skipping": "realfake",
    "DatasetLayoutError": "samples",
    "Sample": "samples",
    "index_source": "samples",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
