"""Typed configs of `histo index` (IndexConfig) and `histo search` (SearchConfig); defaults in histo/configs/.

The models hold the types and the valid ranges; the values come from `histo/configs/index.yaml` and
`search.yaml` (see `histo.config`). A consumer reads `cfg.params.nprobe`, `cfg.search.stage1_tiles`, `cfg.k`.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, model_validator

from histo.config import (
    AsTuple,
    Device,
    KeyedError,
    Positive,
    PositiveInt,
    RunOptions,
    Section,
    Seed,
    StageConfig,
)
from pathology.config import EncoderName, Precision, TileRule
from search.kinds import check_name

IndexType = Annotated[str, AfterValidator(check_name)]  # a float kind of search/kinds.py's table
BarcodeKind = Annotated[str, AfterValidator(partial(check_name, binary=True))]  # a barcode kind there
Mode = Literal["barcode", "float"]
MIN_POINTS_PER_LIST = 39  # FAISS k-means warns below this many training points per centroid


class IndexParams(Section):
    """FAISS parameters of the float and barcode indexes (null: chosen from N or calibrated)."""

    nlist: PositiveInt | None
    nprobe: PositiveInt | None
    pq_m: PositiveInt | None
    pq_nbits: Annotated[int, Field(ge=1, le=16)]
    rerank: PositiveInt
    hnsw_m: Annotated[int, Field(ge=2)]
    ef_construction: PositiveInt
    ef_search: PositiveInt | None
    recall_target: Annotated[float, Field(gt=0, le=1)]
    calibration_queries: PositiveInt
    calibration_k: PositiveInt
    train_points_per_list: Annotated[int, Field(ge=MIN_POINTS_PER_LIST)]
    barcode_index: BarcodeKind | None
    gpu_shard: bool
    seed: Seed


class IndexSearch(Section):
    """The index's search defaults, stored in its manifest (first stage and reported matches)."""

    tile_k: PositiveInt | None
    stage1_tiles: PositiveInt
    n_matches: PositiveInt


class EvaluateConfig(Section):
    k: Annotated[tuple[PositiveInt, ...], AsTuple, Field(min_length=1)]
    mode: Mode
    strategy: Literal["exhaustive", "two-stage"]  # every slide ranked (published protocol) | the search's


class UpdateConfig(Section):
    """Growing an index in place (search/growth.py): when parts are merged and when to advise a retrain."""

    max_parts: Annotated[int, Field(ge=1)]
    max_removed_fraction: Annotated[float, Field(gt=0, le=1)]
    max_imbalance_growth: Annotated[float, Field(ge=1)]


class IndexRun(RunOptions):
    device: Device
    batch_size: PositiveInt
    verify_features: Literal["quick", "full"]  # stored features on a re-run: stamp check | decode all


class IndexConfig(StageConfig):
    """`histo index`: `type`, `params` and `search` are recorded in the index manifest."""

    stage = "index"
    type: IndexType
    encoder: EncoderName | None  # a registry encoder read from `weights`; None: a histo checkpoint (--model)
    weights: str | None  # the encoder's weight file (.pth, pytorch_model.bin, .safetensors)
    tile_rule: TileRule
    grid: PositiveInt | None  # grid crops per side; None: matched to the encoder's µm/px
    precision: Precision | None  # None: the encoder's own
    input_px: PositiveInt | None  # None: the encoder's input size
    params: IndexParams
    search: IndexSearch
    evaluate: EvaluateConfig
    update: UpdateConfig
    run: IndexRun


def index_params(value: IndexParams | Mapping[str, Any] | None = None, source: str = "config") -> IndexParams:
    """Index parameters from an IndexParams, None (the defaults) or a mapping over the defaults."""
    return IndexConfig.section("params", value, source)


class SearchRun(RunOptions):
    device: Device
    verify: Literal["full", "size", "none"]
    weights: str | None  # an encoder index's weight file where it is now (sha256 checked); None: as recorded


class PatchBands(Section):
    """How far a query patch's field of view may stray from the index tile's (per side) and from a square
    (search/patch_fit.py): refused outside the refuse bounds, searched with a warning between them and the
    warn bounds."""

    refuse_below: Positive
    warn_below: Positive
    warn_above: Positive
    refuse_above: Positive
    warn_aspect: Annotated[float, Field(ge=1)]
    refuse_aspect: Annotated[float, Field(ge=1)]

    @model_validator(mode="after")
    def _nested(self) -> PatchBands:
        if not self.refuse_below <= self.warn_below <= 1 <= self.warn_above <= self.refuse_above:
            raise KeyedError(
                "warn_below",
                "need refuse_below <= warn_below <= 1 <= warn_above <= refuse_above, got "
                f"{self.refuse_below}, {self.warn_below}, {self.warn_above}, {self.refuse_above}",
            )
        if self.warn_aspect > self.refuse_aspect:
            raise KeyedError(
                "warn_aspect",
                f"need warn_aspect <= refuse_aspect, got {self.warn_aspect} > {self.refuse_aspect}",
            )
        return self


class QueryChecks(Section):
    """What a query file must be before it is searched: its scale, its declared pixels, a patch's field."""

    mpp: Positive | None  # µm/px of a query patch, and of a query slide without a scale of its own
    max_pixels: PositiveInt  # a query image declaring more is refused before its pixels are decoded
    patch: PatchBands


class SearchConfig(StageConfig):
    """`histo search`: what a query returns; tile_k / stage1_tiles null take the index's defaults."""

    stage = "search"
    k: PositiveInt
    patch_k: PositiveInt
    mode: Mode
    patch_mode: Mode
    exclude_same_patient: bool
    exhaustive: bool
    tile_k: PositiveInt | None
    stage1_tiles: PositiveInt | None
    query: QueryChecks
    run: SearchRun
