"""The index kinds table (search/kinds.py): what the config and the CLI accept, factory-built indexes equal
to FAISS's own classes byte for byte, IVF with an HNSW quantizer as one row, parameters as one object (a registered throwaway kind is used end
to end in test_slide_index.py)."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner
from test_search_index import clustered  # vectors around random centres, as slide features

from histo.errors import ConfigError, HistoError
from search.config import IndexConfig
from search.index import (
    IndexParameters,
    build_float_index,
    default_nlist,
    held_out_rows,
    load_float_index,
    recall_at_k,
    resolve_faiss_device,
    sample_rows,
)
from search.kinds import FLOAT_KINDS, IndexKind, float_kind, kind_names, register, unregister


def serialized(index) -> bytes:
    import faiss

    return faiss.serialize_index(index).tobytes()


def test_config_and_cli_choices_are_the_table() -> None:
    from histo.cli import main

    assert kind_names() == ["flat", "ivf", "ivfpq", "hnsw", "ivf_hnsw"] == list(FLOAT_KINDS)
    assert IndexConfig.coerce({"type": "ivf_hnsw"}).type == "ivf_hnsw"
    with pytest.raises(
        ConfigError, match=r"type: input should be 'flat', 'ivf', 'ivfpq', 'hnsw' or 'ivf_hnsw', got 'x'"
    ):
        IndexConfig.coerce({"type": "x"})
    with pytest.raises(
        ConfigError, match=r"params\.barcode_index: input should be 'flat' or 'ivf', got 'hnsw'"
    ):
        IndexConfig.coerce({"params": {"barcode_index": "hnsw"}})
    help_text = CliRunner().invoke(main, ["index", "--help"]).output
    assert "flat | ivf | ivfpq | hnsw | ivf_hnsw" in " ".join(help_text.split())
    with pytest.raises(
        HistoError, match=r"unknown index type 'x' \(choose from flat, ivf, ivfpq, hnsw, ivf_hnsw\)"
    ):
        float_kind("x")
    with pytest.raises(ValueError, match="already registered"):
        register(IndexKind("ivf", "IVF{nlist},Flat", "again"))
    typo = register(IndexKind("typo_test", "IVF{nlists},Flat", "a row with a misspelt parameter"))
    try:
        with pytest.raises(
            HistoError, match="index kind 'typo_test': factory parameter 'nlists' is not an index"
        ):
            build_float_index(clustered(100), "typo_test")
    finally:
        unregister(typo.name)


def test_factory_built_indexes_equal_the_faiss_classes_they_replace() -> None:
    """Index files written before the table (hand-built FAISS classes) and after it are the same bytes."""
    import faiss

    x = clustered(3000, seed=1)
    params = {"calibration_queries": 100, "nprobe": 4, "ef_search": 32}
    for kind in ("flat", "ivf", "ivfpq", "hnsw"):
        built = build_float_index(x, kind, params)
        p = built.params
        if kind == "hnsw":
            hnsw = faiss.IndexHNSWFlat(64, 32)
            hnsw.hnsw.efConstruction = 40
            hand = faiss.IndexIDMap(hnsw)
        elif kind == "ivfpq":
            hand = faiss.IndexIVFPQ(faiss.IndexFlatL2(64), 64, p["nlist"], 64 // 16, p["pq_nbits"])
        elif kind == "ivf":
            hand = faiss.IndexIVFFlat(faiss.IndexFlatL2(64), 64, p["nlist"], faiss.METRIC_L2)
        else:
            hand = faiss.IndexFlatL2(64)
            hand.add(x)
        if kind != "flat":
            if kind != "hnsw":
                hand.cp.seed = 0
                hand.train(sample_rows(x, p["nlist"] * 64, 0))
            held = held_out_rows(len(x), None, 100, 0)
            hand.add_with_ids(x[~held], np.flatnonzero(~held).astype(np.int64))
            faiss.ParameterSpace().set_index_parameter(
                hand, "efSearch" if kind == "hnsw" else "nprobe", 32 if kind == "hnsw" else 4
            )
            hand.add_with_ids(x[held], np.flatnonzero(held).astype(np.int64))
        assert serialized(built.index) == serialized(hand), kind


def test_ivf_with_an_hnsw_quantizer_is_one_row(tmp_path) -> None:
    import faiss

    both = clustered(4050, seed=5)
    x, q = both[:4000], both[4000:]
    index = build_float_index(x, "ivf_hnsw", {"calibration_queries": 100})
    ivf = faiss.extract_index_ivf(index.index)
    assert isinstance(faiss.downcast_index(ivf.quantizer), faiss.IndexHNSWFlat)
    p = index.params
    assert ivf.nlist == p["nlist"] == default_nlist(len(x)) and ivf.nprobe == p["nprobe"] >= 1
    assert p["calibration_reached_target"] and p["calibrated_recall_at_10"] >= 0.95
    truth = np.argsort(((q[:, None].astype(np.float64) - x[None]) ** 2).sum(-1), axis=1)[:, :10]
    assert recall_at_k(index.search(q, 10)[1], truth) >= 0.9
    index.save(tmp_path / "ivf_hnsw.faiss")
    again = load_float_index(tmp_path / "ivf_hnsw.faiss", "ivf_hnsw", index.parameters)
    np.testing.assert_array_equal(again.search(q, 10)[1], index.search(q, 10)[1])


def test_gpu_support_comes_from_the_row(monkeypatch: pytest.MonkeyPatch) -> None:
    import faiss

    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 2)  # as on a GPU node (nothing is moved here)
    assert resolve_faiss_device("auto", "ivf") == "gpu" and resolve_faiss_device("auto", "ivf_hnsw") == "cpu"
    for kind in ("hnsw", "ivf_hnsw"):
        with pytest.raises(
            HistoError, match=rf"device cuda: FAISS has no GPU {float_kind(kind).description} index"
        ):
            resolve_faiss_device("cuda", kind)


def test_parameters_are_one_object_requested_and_resolved() -> None:
    x = clustered(2000, seed=3)
    index = build_float_index(x, "ivf", {"calibration_queries": 100})
    params = index.parameters
    assert params.requested.nlist is None and params.requested.nprobe is None  # as the config asked
    assert params.resolved["nlist"] == default_nlist(len(x)) and params.resolved["nprobe"] >= 1
    assert index.params["nprobe"] == params.resolved["nprobe"] and "calibrated_recall_at_10" in index.params
    with pytest.raises(TypeError):
        index.params["nprobe"] = 1  # a read-only view: only a new IndexParameters changes it
    again = IndexParameters.recorded(
        {"params_requested": params.requested.model_dump(), "params": dict(index.params)}, "manifest"
    )
    assert again.effective == index.params and again.requested == params.requested
