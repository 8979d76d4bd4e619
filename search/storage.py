"""The index's structures on disk as parts, and their assembly into the in-memory index.

Rows get a storage id when they are written: a fresh build stores its rows (slides in ID order) as ids
0..N-1; every later add appends its slides' rows after the last id. Each structure (coordinates, barcodes,
float index) is a list of parts, each a file holding a contiguous range of storage ids; an add writes one new
part per structure (a kind that cannot merge parts, `grows: rewrite`, rewrites its one part instead), and a
removal writes nothing: the removed slides leave the catalog, and their rows are dropped when the parts are
assembled. The catalog gives each slide its first storage id (`first`).

In memory the index is always canonical: slides in ID order, each slide's rows contiguous, FAISS ids = row
numbers. Assembly maps storage ids to rows (`RowMap`): flat arrays are gathered into place, IVF parts are
merged (FAISS `merge_from`) and their list ids renumbered, an HNSW graph's ids renumbered with removed rows
left as tombstones (id -1). So a grown flat index holds exactly the arrays a fresh build on the same slides
holds, and its searches return exactly the same results.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from histo.errors import InputFileError
from histo.io import atomic_path

COORDS, BARCODES, FLOAT = "coords", "barcodes", "float"
SUFFIX = {COORDS: ".npy", BARCODES: ".faissb", FLOAT: ".faiss", "catalog": ".json"}


def versioned(role: str, version: int, suffix: str | None = None) -> str:
    """The file name of a structure written by index version `version`, e.g. float.000003.faiss."""
    return f"{role}.{version:06d}{SUFFIX[role] if suffix is None else suffix}"


@dataclass(frozen=True)
class Part:
    """One file of a structure: the storage ids [first, first + rows) it holds."""

    file: str
    first: int
    rows: int

    def record(self) -> dict[str, Any]:
        return {"file": self.file, "first": self.first, "rows": self.rows}


def parts_of(records: Sequence[Mapping[str, Any]]) -> list[Part]:
    """Parts from the manifest's records."""
    return [Part(str(r["file"]), int(r["first"]), int(r["rows"])) for r in records]


@dataclass(frozen=True)
class RowMap:
    """Storage ids -> rows of the canonical in-memory index (-1: a row of a removed slide), and back."""

    to_row: np.ndarray  # (storage rows,)
    from_storage: np.ndarray  # (rows,) the storage id of each row

    @property
    def identity(self) -> bool:
        """True when storage ids are the rows (a fresh or compacted index without removals)."""
        n = len(self.from_storage)
        return len(self.to_row) == n and bool(np.array_equal(self.from_storage, np.arange(n)))

    @property
    def dead(self) -> int:
        """Stored rows that belong to removed slides."""
        return len(self.to_row) - len(self.from_storage)


def row_map(slides: Sequence[Mapping[str, Any]], storage_rows: int) -> RowMap:
    """The RowMap of catalog `slides` (in row order, each with `first` and `n_tiles`)."""
    counts = np.array([s["n_tiles"] for s in slides], dtype=np.int64)
    firsts = np.array([s["first"] for s in slides], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(counts)])[:-1]
    from_storage = np.repeat(firsts - starts, counts) + np.arange(int(counts.sum()))
    to_row = np.full(storage_rows, -1, dtype=np.int64)
    to_row[from_storage] = np.arange(len(from_storage))
    return RowMap(to_row, from_storage)


# ---- coordinates -----------------------------------------------------------------------------------


def write_coords(path: Path, coords: np.ndarray) -> None:
    """One coordinates part: (rows, 2) int64 level-0 x, y, in storage order."""
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.save(fh, np.ascontiguousarray(coords, dtype=np.int64))


def read_coords(index_dir: Path, parts: Sequence[Part], rows: RowMap) -> np.ndarray:
    """The (N, 2) coordinates of the canonical rows."""
    stored = np.concatenate([np.load(index_dir / p.file, allow_pickle=False) for p in parts])
    return stored if rows.identity else stored[rows.from_storage]


# ---- FAISS structures --------------------------------------------------------------------------------


def read_faiss(path: Path, binary: bool) -> Any:
    """A FAISS index file (float or binary; FAISS returns it as its own class); an unreadable one is a
    one-line InputFileError."""
    import faiss

    try:
        return faiss.read_index_binary(str(path)) if binary else faiss.read_index(str(path))
    except RuntimeError:
        raise InputFileError(path, f"not a readable FAISS {'binary ' if binary else ''}index") from None


def write_faiss(path: Path, index: Any) -> None:
    """Write a FAISS index (float or binary) atomically."""
    import faiss

    with atomic_path(path) as tmp:
        if isinstance(index, faiss.IndexBinary):
            faiss.write_index_binary(index, str(tmp))
        else:
            faiss.write_index(index, str(tmp))


def assemble(
    index_dir: Path, parts: Sequence[Part], rows: RowMap, binary: bool, empty: Callable[[], Any]
) -> tuple[Any, int]:
    """The canonical FAISS index of a structure's parts and its tombstones (rows that cannot be deleted).

    `empty()` makes an empty index of the structure's kind (for gathering flat arrays)."""
    import faiss

    indexes = [read_faiss(index_dir / p.file, binary) for p in parts]
    top = indexes[0]
    if isinstance(top, faiss.IndexIDMap) and len(indexes) == 1:  # an HNSW graph: one part, tombstones
        ids = faiss.vector_to_array(top.id_map)
        if not rows.identity:
            ids = np.where(ids >= 0, rows.to_row[np.maximum(ids, 0)], -1).astype(np.int64)
            faiss.copy_array_to_vector(ids, top.id_map)
        return top, int(np.count_nonzero(ids < 0))
    if len(indexes) == 1 and rows.identity:
        return top, 0
    if isinstance(top, (faiss.IndexFlatCodes, faiss.IndexBinaryFlat)):
        return _gather(indexes, parts, rows, empty()), 0
    if isinstance(top, (faiss.IndexIVF, faiss.IndexBinaryIVF)):
        for other in indexes[1:]:
            top.merge_from(other, 0)
        renumber_lists(top.invlists, rows.to_row)
        top.remove_ids(faiss.IDSelectorRange(-1, 0))
        return top, 0
    raise InputFileError(
        index_dir / parts[0].file, f"cannot assemble {len(parts)} parts of a {type(top).__name__}"
    )


def _codes(index: Any) -> tuple[Any, int]:
    """The code vector of a flat (float or binary) index and its bytes per row."""
    import faiss

    return (index.xb if isinstance(index, faiss.IndexBinaryFlat) else index.codes), int(index.code_size)


def _gather(indexes: Sequence[Any], parts: Sequence[Part], rows: RowMap, out: Any) -> Any:
    """A flat index holding the canonical rows, copied from the parts' code arrays once."""
    import faiss

    n = len(rows.from_storage)
    vector, size = _codes(out)
    vector.resize(n * size)
    out.ntotal = n
    target = faiss.rev_swig_ptr(vector.data(), n * size).reshape(n, size) if n else None
    for index, part in zip(indexes, parts, strict=True):
        stored_vector, _ = _codes(index)
        stored = faiss.rev_swig_ptr(stored_vector.data(), part.rows * size).reshape(part.rows, size)
        where = rows.to_row[part.first : part.first + part.rows]
        keep = where >= 0
        if target is not None and keep.any():
            target[where[keep]] = stored[keep]
    return out


def renumber_lists(invlists: Any, to_row: np.ndarray) -> None:
    """Map every id of FAISS inverted lists through `to_row` in place (ids of removed rows become -1)."""
    import faiss

    for i in range(invlists.nlist):
        size = invlists.list_size(i)
        if size:
            ids = faiss.rev_swig_ptr(invlists.get_ids(i), size)
            ids[:] = to_row[ids]
