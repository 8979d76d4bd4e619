"""Training data from a tile store: the high-cellularity tiles of each slide, labelled with the slide label.

The split is by patient (no patient on both sides), stratified by class. Samplers draw one global order
per epoch from (seed, epoch) and hand rank r the positions r, r + W, ...; a global batch of B is then the
same B tiles whatever the number of processes W, and each tile's augmentation seed travels with its
index, so results do not depend on W or on the number of DataLoader workers.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections import Counter, defaultdict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from histo.errors import HistoError, InputFileError
from pathology.augment import IMAGENET_MEAN, IMAGENET_STD, augment, normalize, resize, to_tensor
from pathology.config import AugmentConfig


@dataclass
class TrainingData:
    """What to train on: (slide_id, selected-tile position, class index) items per side, and provenance."""

    classes: list[str]
    train: list[tuple[str, int, int]]
    val: list[tuple[str, int, int]]
    train_patients: list[str]
    val_patients: list[str]
    skipped: list[dict[str, str]] = field(default_factory=list)
    data_hash: str = ""


def usable_slides(store: Any, skip_missing: bool) -> tuple[list[Any], list[dict[str, str]]]:
    """Records of labelled slides whose pixels can be read; a moved slide fails unless `skip_missing`."""
    records, skipped = [], []
    for sid in store.slide_ids():
        rec = store.record(sid)
        if rec.label in (None, ""):
            skipped.append({"slide_id": sid, "reason": "no label"})
        elif rec.n_selected == 0:
            skipped.append({"slide_id": sid, "reason": "no selected tiles"})
        elif not store.has_pixels(sid) and not Path(rec.source_path).is_file():
            if not skip_missing:
                raise InputFileError(
                    rec.source_path,
                    f"slide {sid} of tile store {store.path} has moved or is missing "
                    "(restore it, re-tile with saved pixels, or pass --skip-missing)",
                )
            skipped.append({"slide_id": sid, "reason": f"slide file missing: {rec.source_path}"})
        else:
            records.append(rec)
    return records, skipped


def split_patients(
    patients_by_class: Mapping[str, list[str]], val_fraction: float, seed: int
) -> tuple[set[str], set[str]]:
    """Stratified patient split: per class, round(fraction * n) patients (>= 1 when n >= 2) go to val."""
    rng = random.Random(seed)
    train, val = set(), set()
    for label in sorted(patients_by_class):
        patients = sorted(set(patients_by_class[label]) - train - val)
        rng.shuffle(patients)
        n_val = min(len(patients) - 1, max(1, round(val_fraction * len(patients)))) if val_fraction > 0 else 0
        val.update(patients[: max(n_val, 0)])
        train.update(patients[max(n_val, 0) :])
    return train, val


def plan_training_data(
    store: Any, val_fraction: float, seed: int, skip_missing: bool = False
) -> TrainingData:
    """Choose classes, split slides by patient and list every selected tile (errors for unusable stores)."""
    records, skipped = usable_slides(store, skip_missing)
    if not records:
        reasons = Counter(s["reason"].split(":")[0] for s in skipped)
        detail = ", ".join(f"{n} {r}" for r, n in reasons.items()) or "no slides"
        raise InputFileError(store.path, f"no slide has both a label and selected tiles ({detail})")
    classes = sorted({str(r.label) for r in records})
    if len(classes) < 2:
        raise InputFileError(store.path, f"training needs at least 2 classes, found only {classes[0]!r}")
    patient_of = {r.slide_id: str(r.patient or r.slide_id) for r in records}
    by_class: dict[str, list[str]] = defaultdict(list)
    for r in records:
        by_class[str(r.label)].append(patient_of[r.slide_id])
    train_p, val_p = split_patients(by_class, val_fraction, seed)
    if not val_p:
        raise InputFileError(
            store.path, "too few patients for a patient-level validation split (need 2 in a class)"
        )
    index = {c: i for i, c in enumerate(classes)}
    train, val = [], []
    for r in records:
        items = [(r.slide_id, j, index[str(r.label)]) for j in range(int(r.n_selected))]
        (val if patient_of[r.slide_id] in val_p else train).extend(items)
    digest = hashlib.sha256(
        json.dumps(
            [
                store.params,
                [(r.slide_id, str(r.label), patient_of[r.slide_id], int(r.n_selected)) for r in records],
            ],
            sort_keys=True,
            default=str,
        ).encode()
    ).hexdigest()
    return TrainingData(classes, train, val, sorted(train_p), sorted(val_p), skipped, digest)


class TileDataset(Dataset):
    """Tiles of a store as (tensor (3, px, px) normalised with `mean`/`std`, class index), read lazily per worker.

    Keys are `(item index, augmentation seed)`; a seed < 0 (or `augment_cfg=None`) means no augmentation.
    Pixels come from the store when saved, otherwise from the source slide (kept open per worker).
    """

    def __init__(
        self,
        store_path: str | Path,
        items: list[tuple[str, int, int]],
        input_px: int,
        augment_cfg: AugmentConfig | None = None,
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
    ) -> None:
        self.store_path = str(store_path)
        self.items = items
        self.input_px = input_px
        self.augment_cfg = augment_cfg
        self.mean, self.std = tuple(mean), tuple(std)
        self._store: Any = None
        self._slides: dict[str, Any] = {}
        self._coords: dict[str, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.items)

    def __getstate__(self) -> dict[str, Any]:
        # Open handles stay in the process that opened them; each worker opens its own.
        return {**self.__dict__, "_store": None, "_slides": {}, "_coords": {}}

    def _read(self, slide_id: str, j: int) -> np.ndarray:
        from pathology.store import TileStore

        if self._store is None:
            self._store = TileStore.open(self.store_path)
        if self._store.has_pixels(slide_id):
            return self._store.read_selected(slide_id, np.array([j]))[0]
        if slide_id not in self._slides:
            from pathology.slide import open_slide, recorded_reader

            rec = self._store.record(slide_id)
            reader = recorded_reader(rec.reader)
            self._slides[slide_id] = (open_slide(rec.source_path, mpp_override=rec.mpp, reader=reader), rec)
            self._coords[slide_id] = self._store.coords(slide_id)[self._store.selected(slide_id)]
        slide, rec = self._slides[slide_id]
        x, y = self._coords[slide_id][j]
        tile = slide.read_tile(int(x), int(y), rec.tile_size_level0, int(rec.tile_px))
        return self._store.normalize(tile[None], rec.source_path)[0]

    def __getitem__(self, key: tuple[int, int] | int) -> tuple[torch.Tensor, int]:
        i, seed = key if isinstance(key, tuple) else (key, -1)
        slide_id, j, label = self.items[i]
        x = to_tensor(self._read(slide_id, j))
        if self.augment_cfg is not None and seed >= 0:
            x = augment(x, self.input_px, self.augment_cfg, torch.Generator().manual_seed(int(seed)))
        else:
            x = resize(x, self.input_px)
        return normalize(x, self.mean, self.std), label


def balanced_weights(labels: list[int]) -> torch.Tensor:
    """Per-sample weights 1 / (class count): every class is drawn equally often."""
    counts = Counter(labels)
    return torch.tensor([1.0 / counts[y] for y in labels], dtype=torch.float64)


class EpochSampler(Sampler):
    """Yields this rank's `(index, augmentation seed)` keys of one global per-epoch order.

    Training: `num_samples` draws (with replacement from `weights` when given, else a permutation),
    truncated to whole global batches; rank r takes positions r::world_size. Evaluation (`shuffle=False`):
    indices in order, no seeds, no truncation.
    """

    def __init__(
        self,
        n: int,
        *,
        weights: torch.Tensor | None = None,
        shuffle: bool = True,
        num_samples: int | None = None,
        global_batch: int = 1,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
    ) -> None:
        self.n, self.weights, self.shuffle = n, weights, shuffle
        self.num_samples = num_samples or n
        self.global_batch, self.rank, self.world_size, self.seed = global_batch, rank, world_size, seed
        self.epoch = 0
        if shuffle and self.num_samples < global_batch:
            raise HistoError(f"{self.num_samples} training tiles are fewer than one batch of {global_batch}")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _global_order(self) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.shuffle:
            return torch.arange(self.n), torch.full((self.n,), -1)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        if self.weights is not None:
            order = torch.multinomial(self.weights, self.num_samples, replacement=True, generator=g)
        else:
            order = torch.cat(
                [torch.randperm(self.n, generator=g) for _ in range(-(-self.num_samples // self.n))]
            )
        order = order[: self.num_samples - self.num_samples % self.global_batch]
        return order, torch.randint(0, 2**31 - 1, (len(order),), generator=g)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        order, seeds = self._global_order()
        mine = slice(self.rank, None, self.world_size)
        yield from zip(order[mine].tolist(), seeds[mine].tolist(), strict=True)

    def __len__(self) -> int:
        total = self.n if not self.shuffle else self.num_samples - self.num_samples % self.global_batch
        return len(range(self.rank, total, self.world_size))
