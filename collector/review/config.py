"""The review page's and the ranking's settings: plain pydantic models, light to import, so
`collector --help` shows their flags without loading the web app or a backbone."""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import BaseModel, Field

IMAGENET = "imagenet"   # the shipped ImageNet EfficientNet-Lite0 features: needs no trained run
DEFAULT_FOLDS = 5
DATA_HELP = "the collection folder (output_dir) that holds manifest.sqlite"


class ReviewConfig(BaseModel):
    """Review the collected images in a browser: filter, approve, reject, relabel, undo.
    The page listens on 127.0.0.1; every decision is written to the manifest at once."""

    data: Path = Field(Path("collected"), description=DATA_HELP)
    host: str = Field("127.0.0.1", description=(
        "interface to listen on; keep it local (any other host needs the token printed at "
        "start)"))
    port: int = Field(8765, ge=0, le=65535, description="port (0 = any free port)")
    browser: bool = Field(True, description="open the page in the default browser "
                                            "(--no-browser to skip)")
    rank: str | None = Field(None, description=(
        "before serving, rank images by how likely their label is wrong with this model: "
        "'imagenet', a trainer run folder, an .onnx path or a BentoML tag "
        "(same as `collector rank --model`)"))
    thumbnail_dir: Path | None = Field(None, description=(
        "thumbnail cache; default: .review/thumbs beside the manifest"))


class RankConfig(BaseModel):
    """Rank the collected images by how likely their label is wrong (out-of-sample
    k-fold predictions); the review page shows them and sorts by 'suspect'."""

    data: Path = Field(Path("collected"), description=DATA_HELP)
    model: str = Field(IMAGENET, description=(
        "features from: 'imagenet' (shipped ImageNet EfficientNet-Lite0; needs no run), a "
        "trainer run folder holding an exported .onnx, an .onnx path, or a BentoML model tag"))
    folds: int = Field(DEFAULT_FOLDS, ge=2, le=20, description=(
        "k of the k-fold: each image is predicted by a model fit on the other k-1 folds"))
    threads: int = Field(max(1, min(4, os.cpu_count() or 1)), ge=1,
                         description="CPU threads for the backbone")
    cache_dir: Path | None = Field(None, description=(
        "embedding cache; default: .review/ beside the manifest"))
