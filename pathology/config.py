"""Typed configs of `histo tile` (TileConfig) and `histo train` (TrainConfig); defaults in histo/configs/.

The models hold the types and the valid ranges; the values come from `histo/configs/tile.yaml` and
`train.yaml` (see `histo.config`). A consumer reads `cfg.tile.px`, `cfg.cellularity.rule`, `cfg.optim.lr`.
"""

from __future__ import annotations

from functools import cached_property
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BeforeValidator, Field, model_validator

from histo.config import (
    AsTuple,
    Count,
    Fraction,
    KeyedError,
    NonNegative,
    NormName,
    OpenFraction,
    PathStr,
    Positive,
    PositiveInt,
    RunOptions,
    Section,
    Seed,
    StageConfig,
)
from histo.training_config import LoopOptions, LoopRun
from pathology.geometry import TileGeometry

# ---- histo tile ---------------------------------------------------------------------------------


class TileSize(Section):
    """The stored tile: `px` pixels at the target resolution (from magnification, mpp or um)."""

    px: Annotated[int, Field(ge=8)]
    magnification: Positive
    mpp: Positive | None
    um: Positive | None

    @model_validator(mode="after")
    def _one_scale(self) -> TileSize:
        if self.um is not None and self.mpp is not None:
            raise KeyedError("um", f"set tile.um or tile.mpp, not both (got um={self.um}, mpp={self.mpp})")
        return self


class TissueConfig(Section):
    method: Literal["hsd", "otsu"]
    mpp: Positive
    std_threshold: Annotated[float, Field(ge=0, le=255)]
    hsd_channel: Literal["density", "cy"]
    density_threshold: NonNegative
    cy_threshold: Annotated[float, Field(ge=-1, le=1)]
    filter_rule: Literal["physical", "yottixel"]
    filter_um: Positive
    ink: Annotated[tuple[Literal["blue", "green", "black"], ...], AsTuple]
    ink_margin_um: NonNegative
    otsu_min_saturation: Fraction
    min_brightness: Annotated[float, Field(ge=0, le=255)]


class MosaicConfig(Section):
    min_tissue_fraction: Fraction
    colour_mpp: Positive | None
    n_clusters: PositiveInt
    percent: Annotated[float, Field(gt=0, le=100)]
    edge_tiles: Literal["whole", "partial"]  # partial: edge tiles scored on their tissue, read padded
    grid_anchor: Literal["slide", "tissue"]  # tissue: the grid starts at the tissue's bounding box


def _registered_encoder(name: str) -> str:
    """`name` if it is a registered encoder (`histo encoders`); the registry is imported only then."""
    from pathology.encoders.registry import check_encoder

    return check_encoder(name)


EncoderName = Annotated[str, AfterValidator(_registered_encoder)]  # a name of pathology/encoders' registry
TileRule = Literal["resize", "grid"]  # tile -> encoder input: the whole tile resized | n x n crops, mean
Precision = Literal["float32", "bfloat16", "float16"]

CellularityScore = Literal["pixel_fraction", "nuclei_density"]


class CellularityConfig(Section):
    mpp: Positive
    h_threshold: NonNegative
    nucleus_radius_um: Positive
    rule: Literal["top_fraction", "top_k", "min_score"]
    top_fraction: Annotated[float, Field(gt=0, le=1)]
    top_k: PositiveInt
    score: CellularityScore
    min_score: NonNegative  # in the unit of `score`: a fraction, or nuclei per mm²

    @model_validator(mode="after")
    def _min_score_in_unit(self) -> CellularityConfig:
        if self.score == "pixel_fraction" and self.min_score > 1:
            raise KeyedError("min_score", f"a pixel fraction is at most 1, got {self.min_score}")
        return self


class FromCoordsConfig(Section):
    """`histo tile --from-coords DIR`: what runs on top of a lab's CLAM/TRIDENT patches."""

    select: Literal["none", "cellularity", "mosaic"]


ClassName = Annotated[str, Field(min_length=1)]


class RoiConfig(Section):
    """`histo tile --roi PATH`: how QuPath annotations restrict or replace the tissue mask."""

    mode: Literal["restrict", "replace"]
    include: Annotated[tuple[ClassName, ...], AsTuple]
    exclude: Annotated[tuple[ClassName, ...], AsTuple]


Reader = Literal["auto", "openslide", "tiatoolbox", "ngff"]
StainMethod = Literal["none", "macenko", "vahadane", "reinhard"]


def _nested_tuples(value: Any) -> Any:
    return tuple(_nested_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


Vec3 = tuple[float, float, float]
NestedTuples = BeforeValidator(_nested_tuples)


class StainFit(Section):
    """A stain target fitted once (to an image or to a store's tiles) and recorded with the store, so every
    later read of its tiles, and every query searched against it, is normalized the same way."""

    method: Literal["macenko", "vahadane", "reinhard"]
    source: PathStr  # what it was fitted to: an image file or a tile store
    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]  # of the fitted pixels
    stain_matrix: Annotated[tuple[Vec3, Vec3], NestedTuples] | None  # macenko, vahadane: unit OD rows H, E
    max_concentrations: Annotated[tuple[Positive, Positive], NestedTuples] | None  # their 99th percentiles
    lab_mean: Annotated[Vec3, NestedTuples] | None  # reinhard: CIELAB mean and std of the target
    lab_std: Annotated[tuple[Positive, Positive, Positive], NestedTuples] | None

    @model_validator(mode="after")
    def _values_of_its_method(self) -> StainFit:
        matrix = self.method != "reinhard"
        given = {
            "stain_matrix": self.stain_matrix is not None,
            "max_concentrations": self.max_concentrations is not None,
            "lab_mean": self.lab_mean is not None,
            "lab_std": self.lab_std is not None,
        }
        wanted = {k: (k in ("stain_matrix", "max_concentrations")) == matrix for k in given}
        for key, present in given.items():
            if present != wanted[key]:
                verb = "needs" if wanted[key] else "does not take"
                raise KeyedError(key, f"a {self.method} fit {verb} {key}")
        return self


class StainConfig(Section):
    """Stain normalization of the tile pixels that reach the encoder (training, index, queries alike)."""

    method: StainMethod
    target: PathStr | None  # an RGB image, or a tile store (fitted to its tiles: the archive)
    luminosity_threshold: OpenFraction
    angular_percentile: Annotated[float, Field(gt=50, lt=100)]
    fit: StainFit | None

    @model_validator(mode="after")
    def _target_for_a_method(self) -> StainConfig:
        if self.method == "none":
            for key in ("target", "fit"):
                if getattr(self, key) is not None:
                    raise KeyedError(key, f"stain.{key} is set but stain.method is none")
        elif self.fit is None and self.target is None:
            raise KeyedError("method", f"{self.method} needs stain.target (an image or a tile store)")
        elif self.fit is not None and self.fit.method != self.method:
            raise KeyedError("fit.method", f"the fit is {self.fit.method}, stain.method is {self.method}")
        return self


class TileRun(RunOptions):
    workers: PositiveInt
    reader: Reader  # not recorded as a parameter: the backend that read each slide is in its record


class TileConfig(StageConfig):
    """`histo tile`: everything but `run` is recorded in the tile store (root attribute `params`)."""

    stage = "tile"
    seed: Seed
    tile: TileSize
    tissue: TissueConfig
    mosaic: MosaicConfig
    cellularity: CellularityConfig
    from_coords: FromCoordsConfig
    roi: RoiConfig
    stain: StainConfig
    run: TileRun

    @cached_property
    def geometry(self) -> TileGeometry:
        """`tile` resolved into the stored tile's px, µm/px and µm, once per config (pathology.geometry)."""
        return TileGeometry.of(self.tile)


# ---- histo train --------------------------------------------------------------------------------

Variant = Literal["I", "II", "III", "IV", "scratch", "norm_only", "norm_shift"]  # pathology/variants.py
Monitor = Literal["val_macro_f1", "val_acc", "val_slide_acc", "val_loss"]


class NetworkConfig(Section):
    """The network `histo train` trains: a registry encoder (`histo encoders`) with a head on its feature."""

    encoder: EncoderName
    norm: NormName | None  # None: the entry's own norms; any registered norm for the DenseNet/CBR entries
    variant: Variant
    init: PathStr | None
    input_px: Annotated[int, Field(ge=32)] | None  # None: the entry's input size

    @model_validator(mode="before")
    @classmethod
    def _arch_renamed(cls, data: Any) -> Any:
        """`model.arch` (before the encoder registry) is refused naming its new key, not as an unknown one."""
        if isinstance(data, dict) and "arch" in data:
            from histo.errors import HistoError
            from pathology.kimianet import encoder_of_arch

            try:
                meant = f"arch {data['arch']} is encoder {encoder_of_arch(str(data['arch']))}; "
            except HistoError:
                meant = ""
            raise KeyedError("arch", f"renamed model.encoder: rename the key ({meant}see `histo encoders`)")
        return data

    @model_validator(mode="after")
    def _fits(self) -> NetworkConfig:
        """Everything about the encoder, norm and variant that can be refused before any work."""
        from histo.errors import HistoError
        from pathology.encoders import get_encoder
        from pathology.kimianet import encoder_entry
        from pathology.variants import network_refusal

        try:
            get_encoder(self.encoder).check_usable()
        except HistoError as e:
            raise KeyedError("encoder", str(e)) from None
        try:
            enc = encoder_entry(self.encoder, self.norm)
        except HistoError as e:
            raise KeyedError("norm", str(e)) from None
        if self.input_px not in (None, enc.input_px) and not enc.flexible_input:
            raise KeyedError("input_px", f"encoder {enc.name!r} takes {enc.input_px} px inputs only")
        reason = network_refusal(self.variant, enc.family, enc.arch.get("norm"))
        if reason is not None:
            raise KeyedError("variant", reason)
        return self  # whether --init is needed (pathology.variants.init_refusal) is checked per run

    @property
    def entry(self) -> Any:
        """The registry entry with this config's norm (pathology.encoders.Encoder)."""
        from pathology.kimianet import encoder_entry

        return encoder_entry(self.encoder, self.norm)

    @property
    def px(self) -> int:
        """The network input size: `input_px`, or the entry's."""
        return int(self.input_px or self.entry.input_px)


class TrainDataConfig(Section):
    val_fraction: Annotated[float, Field(gt=0, lt=1)]
    balanced: bool
    samples_per_epoch: Count
    skip_missing: bool


class AugmentConfig(Section):
    flip: bool
    rot90: bool
    crop_scale: Annotated[tuple[Fraction, Fraction], AsTuple]
    hed_sigma: Annotated[float, Field(ge=0, lt=1)]
    brightness: Annotated[float, Field(ge=0, lt=1)]
    contrast: Annotated[float, Field(ge=0, lt=1)]

    @model_validator(mode="after")
    def _crop_range(self) -> AugmentConfig:
        low, high = self.crop_scale
        if not 0 < low <= high:
            raise KeyedError("crop_scale", f"needs 0 < low <= high <= 1, got {list(self.crop_scale)}")
        return self


class OptimConfig(LoopOptions):
    """The loop options of `histo train` (`batch_size` is the global batch, split over processes)."""

    monitor: Monitor


class TrainRun(LoopRun):
    """`histo train`'s run options: those of every trainer (histo.training_config.LoopRun)."""


class TrainConfig(StageConfig):
    """`histo train`: everything but `run` is recorded in the checkpoint (and checked on --resume)."""

    stage = "train"
    seed: Seed
    model: NetworkConfig
    data: TrainDataConfig
    augment: AugmentConfig
    optim: OptimConfig
    run: TrainRun
