"""Typed configs of `histo index` (IndexConfig) and `histo search` (SearchConfig); defaults in histo/configs/.

The models hold the types and the valid ranges; the values come from `histo/configs/index.yaml` and
`search.yaml` (see `histo.config`). A consumer reads `cfg.params.nprobe`, `cfg.search.stage1_tiles`, `cfg.k`.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field

from histo.config import (
    AsTuple,
    Device,
    PositiveInt,
    RunOptions,
    Section,
    Seed,
    StageConfig,
)
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


class IndexRun(RunOptions):
    device: Device
    batch_size: PositiveInt


class IndexConfig(StageConfig):
    """`histo index`: `type`, `params` and `search` are recorded in the index manifest."""

    stage = "index"
    type: IndexType
    params: IndexParams
    search: IndexSearch
    evaluate: EvaluateConfig
    run: IndexRun


def index_params(value: IndexParams | Mapping[str, Any] | None = None, source: str = "config") -> IndexParams:
    """Index parameters from an IndexParams, None (the defaults) or a mapping over the defaults."""
    return IndexConfig.section("params", value, source)


class SearchRun(RunOptions):
    device: Device
    verify: Literal["full", "size", "none"]


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
    run: SearchRun
