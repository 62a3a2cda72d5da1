"""Specification of the retriever's stage-1 index (modeling_imagebert.retrieval.vector_index), its saved files, and
indexing image files (`ImageBertRetriever.index_images`, modeling_imagebert.retrieval.indexing): exact results
equal the brute force whatever the backend, approximate ones find most true neighbours, a saved index refuses
other settings, and a killed index_images run resumes to the straight result."""

from __future__ import annotations

import os
import random
import signal
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from detector_double import MODEL_SEED, stand_in_processor
from feature_fixtures import write_photos
from kill import kill_at_random_moment
from test_retrieval_evaluation import tiny_config, tiny_model, tiny_processor, toy_test_split

from modeling_imagebert import ImageBertForRetrieval
from modeling_imagebert.processing_imagebert import ImageBertProcessor
from modeling_imagebert.retrieval.evaluation import RetrievalInputs
from modeling_imagebert.retrieval.retriever import ImageBertRetriever
from modeling_imagebert.retrieval.two_stage import embed_texts, score_pairs
from modeling_imagebert.retrieval.vector_index import (
    IndexOptions,
    VectorIndex,
    exact_similarity,
    import_faiss,
)

faiss = (
    import_faiss()
)  # the `index` extra (pip install faiss-cpu), part of `dev`; the exact path works without it
needs_faiss = pytest.mark.skipif(faiss is None, reason="needs faiss (pip install faiss-cpu)")

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def unit_vectors(count: int, dim: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(count, dim, generator=generator), dim=-1)


def clustered(count: int, dim: int, seed: int, clusters: int = 50) -> torch.Tensor:
    """Unit vectors around `clusters` random centres (closer to real embeddings than uniform ones)."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.nn.functional.normalize(torch.randn(clusters, dim, generator=generator), dim=-1)
    noise = torch.nn.functional.normalize(torch.randn(count, dim, generator=generator), dim=-1)
    picks = torch.randint(0, clusters, (count,), generator=generator)
    return torch.nn.functional.normalize(centres[picks] + 0.8 * noise, dim=-1)


def torch_only(index: VectorIndex) -> VectorIndex:
    """The same embeddings searched by the torch brute force (what an install without faiss runs)."""
    return VectorIndex("exact", index.embeddings, index.options)


@pytest.fixture(scope="module")
def processor(minilm_path) -> ImageBertProcessor:
    return tiny_processor(minilm_path)


@pytest.fixture(scope="module")
def model():
    return tiny_model(ImageBertForRetrieval, seed=3).eval()


@pytest.fixture(scope="module")
def split():
    return toy_test_split(num_images=40)  # 40 images x 5 captions


# ----------------------------------------------------------------------------------------------------------------------
# Exact search
# ----------------------------------------------------------------------------------------------------------------------


@needs_faiss
def test_faiss_exact_search_returns_the_brute_force_top_k_on_10000_random_embeddings():
    images, queries = unit_vectors(10_000, 256, seed=0), unit_vectors(300, 256, seed=1)
    index = VectorIndex.build(images, "exact")
    assert isinstance(index.faiss_index, faiss.IndexFlatIP)
    ids, similarity = index.search(queries, 10)
    brute = (queries @ images.t()).topk(10, dim=1)
    assert torch.equal(ids, brute.indices)
    torch.testing.assert_close(similarity, brute.values.double(), rtol=0, atol=1e-6)
    # The same ids, order and similarities, bit for bit, through torch alone and one query at a time.
    torch_ids, torch_similarity = torch_only(index).search(queries, 10)
    assert torch.equal(ids, torch_ids) and torch.equal(similarity, torch_similarity)
    for row in (0, 123, 299):
        one_ids, one_similarity = index.search(queries[row : row + 1], 10)
        assert torch.equal(one_ids[0], ids[row]) and torch.equal(one_similarity[0], similarity[row])


def test_the_exact_similarity_is_a_function_of_the_two_vectors_alone():
    images, queries = unit_vectors(500, 96, seed=2), unit_vectors(7, 96, seed=3)
    ids = torch.randint(0, 500, (7, 30), generator=torch.Generator().manual_seed(0))
    together = exact_similarity(queries, images, ids)
    alone = torch.stack([exact_similarity(queries[q : q + 1], images, ids[q : q + 1, c : c + 1])[0, 0]
                         for q in range(7) for c in range(30)]).view(7, 30)  # fmt: skip
    assert torch.equal(together, alone)
    expected = (queries.double()[:, None, :] * images.double()[ids]).sum(-1)
    torch.testing.assert_close(together, expected, rtol=0, atol=1e-15)


def test_ties_rank_the_image_indexed_first_even_beyond_the_shortlist():
    images = unit_vectors(2000, 64, seed=4)
    images[1500:1600] = images[700]  # 101 copies of one image: far more ties than the shortlist's margin
    index = VectorIndex.build(images, "exact")
    ids, similarity = index.search(images[700:701], 10)
    assert ids[0].tolist() == [700, *range(1500, 1509)]
    assert len(set(similarity[0].tolist())) == 1
    torch_ids, torch_similarity = torch_only(index).search(images[700:701], 10)
    assert torch.equal(ids, torch_ids) and torch.equal(similarity, torch_similarity)


def brute_force_search(retriever: ImageBertRetriever, queries: list[str], top_k: int):
    """The retriever's search before the faiss index (commit ef735a1), kept as the reference: one matrix product
    of the query and image embeddings, its top `candidates`, re-ranked by the cross-encoder."""
    text = retriever.processor(text=list(queries))
    text = {"input_ids": text["input_ids"], "attention_mask": text["attention_mask"]}
    text_embeds = embed_texts(retriever.model, text, batch_size=retriever.batch_size)
    similarity = text_embeds @ retriever.image_embeds.t()
    k = min(retriever.candidates, similarity.shape[1])
    top = similarity.topk(k, dim=1)
    inputs = RetrievalInputs(
        retriever.image_ids, torch.zeros(len(queries), dtype=torch.long), text, retriever.images
    )
    caption_index = torch.arange(len(queries)).repeat_interleave(k)
    scores = score_pairs(
        retriever.model, inputs, caption_index, top.indices.reshape(-1), batch_size=retriever.batch_size
    ).view(len(queries), k)
    if retriever.final_score == "itm+itc":
        scores = scores + float(retriever.model.itc_head.scale().detach()) * top.values
    order = scores.argsort(dim=1, descending=True, stable=True)[:, :top_k]
    return [
        [
            (retriever.image_ids[int(top.indices[q, j])], float(scores[q, j]), float(top.values[q, j]))
            for j in row
        ]
        for q, row in enumerate(order.tolist())
    ]


@pytest.mark.parametrize("backend", [pytest.param("faiss", marks=needs_faiss), "torch"])
@pytest.mark.parametrize("final_score", ["itm", "itm+itc"])
def test_the_exact_retriever_answers_as_the_brute_force_did(
    model, processor, split, final_score, backend, monkeypatch
):
    if backend == "torch":
        monkeypatch.setitem(
            sys.modules, "faiss", None
        )  # an install without faiss: import faiss raises ImportError
    retriever = ImageBertRetriever(model, processor, candidates=4, final_score=final_score).index(split)
    assert len(retriever.image_ids) == 40
    assert (retriever.vector_index.faiss_index is not None) == (backend == "faiss")
    queries = [split[i]["caption"] for i in (0, 7, 31, 77, 150)]
    hits = retriever.search(queries, top_k=4)
    expected = brute_force_search(retriever, queries, top_k=4)
    for got, want in zip(hits, expected, strict=True):
        assert [hit.image_id for hit in got] == [image_id for image_id, _, _ in want]
        # itm scores are the same pairs' cross-encoder outputs, bit for bit; itm+itc adds the similarity, whose
        # float32 matrix product differs from the exact value in the last bits.
        exact = final_score == "itm"
        assert [hit.score for hit in got] == pytest.approx([s for _, s, _ in want], rel=0 if exact else 1e-6)
        assert [hit.similarity for hit in got] == pytest.approx([s for _, _, s in want], rel=0, abs=1e-6)


@needs_faiss
def test_the_exact_retriever_answers_the_same_with_and_without_faiss(model, processor, split, monkeypatch):
    queries = [split[i]["caption"] for i in (0, 7, 31, 77, 150)]
    with_faiss = ImageBertRetriever(model, processor, candidates=4, final_score="itm+itc").index(split)
    monkeypatch.setitem(sys.modules, "faiss", None)
    without = ImageBertRetriever(model, processor, candidates=4, final_score="itm+itc").index(split)
    assert without.vector_index.faiss_index is None
    assert without.search(queries, top_k=4) == with_faiss.search(queries, top_k=4)  # bit for bit


def test_without_faiss_an_approximate_index_asks_for_faiss_cpu_in_one_line(
    model, processor, split, monkeypatch
):
    monkeypatch.setitem(sys.modules, "faiss", None)
    for index_type in ("ivf", "hnsw"):
        with pytest.raises(ImportError, match=r"^index_type='\w+' needs faiss: pip install faiss-cpu$"):
            ImageBertRetriever(model, processor, index_type=index_type).index(split)
    with pytest.warns(UserWarning, match="faiss is not installed: searching them exactly"):
        index = VectorIndex.build(unit_vectors(50, 8, seed=0), "auto", {"exact_limit": 10})
    assert index.kind == "exact"


@needs_faiss
def test_auto_is_exact_up_to_the_limit_then_ivf_or_autofaiss(monkeypatch):
    vectors = clustered(3000, 32, seed=5)
    assert VectorIndex.build(vectors, "auto", {"exact_limit": 3000}).kind == "exact"
    assert VectorIndex.build(vectors, "auto", {"exact_limit": 2999}).kind == "ivf"
    calls = []

    def build_index(embeddings, **kwargs):  # autofaiss.build_index's contract: (faiss index, infos)
        calls.append(kwargs)
        index = faiss.IndexHNSWFlat(embeddings.shape[1], 16, faiss.METRIC_INNER_PRODUCT)
        index.add(embeddings)
        return index, {}

    monkeypatch.setitem(sys.modules, "autofaiss", types.SimpleNamespace(build_index=build_index))
    index = VectorIndex.build(vectors, "auto", {"exact_limit": 2999})
    assert index.kind == "autofaiss" and calls[0]["metric_type"] == "ip"
    assert index.search(vectors[:5], 3)[0][:, 0].tolist() == [0, 1, 2, 3, 4]


@needs_faiss
@pytest.mark.parametrize("index_type", ["ivf", "hnsw"])
def test_approximate_indexes_find_most_true_neighbours_on_clustered_embeddings(index_type):
    images, queries = clustered(5000, 64, seed=6), clustered(200, 64, seed=7)
    exact_ids, _ = VectorIndex.build(images, "exact").search(queries, 10)
    index = VectorIndex.build(images, index_type)
    ids, similarity = index.search(queries, 10)
    recall = np.mean(
        [len(set(a.tolist()) & set(b.tolist())) / 10 for a, b in zip(ids, exact_ids, strict=True)]
    )
    assert recall >= 0.9, recall
    # Whatever the backend proposed, the similarities reported are the exact ones of those ids.
    assert torch.equal(similarity, exact_similarity(queries, images, ids))
    assert (similarity[:, :-1] >= similarity[:, 1:]).all()


def test_index_options_are_checked_and_filled_in_from_the_size():
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['nprobes'\]"):
        IndexOptions.from_mapping({"nprobes": 4})
    with pytest.raises(ValueError, match="nlist must be an int >= 1"):
        IndexOptions.from_mapping({"nlist": 0})
    options = IndexOptions().resolved(1_000_000)
    assert (options.nlist, options.nprobe, options.train_size) == (4096, 64, 163_840)
    assert IndexOptions().resolved(100).nlist == 2  # at least 39 training vectors per cell
    if faiss is not None and faiss.get_num_gpus() == 0:
        with pytest.raises(RuntimeError, match="use_gpu=True, but faiss sees no GPU"):
            VectorIndex.build(unit_vectors(100, 8, seed=0), "exact", {"use_gpu": True})


# ----------------------------------------------------------------------------------------------------------------------
# Saved indexes
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "index_type", ["exact", pytest.param("ivf", marks=needs_faiss), pytest.param("hnsw", marks=needs_faiss)]
)
def test_a_saved_index_answers_like_the_fresh_one(model, processor, split, index_type, tmp_path):
    options = {"nlist": 4, "nprobe": 2} if index_type == "ivf" else None
    fresh = ImageBertRetriever(model, processor, candidates=4, index_type=index_type, index_options=options)
    fresh.index(split).save_index(tmp_path / "index.safetensors")
    loaded = ImageBertRetriever(model, processor, candidates=4, index_type=index_type).load_index(
        tmp_path / "index.safetensors", image_ids=fresh.image_ids
    )
    assert (
        loaded.vector_index.kind == index_type and loaded.vector_index.options == fresh.vector_index.options
    )
    assert torch.equal(loaded.image_embeds, fresh.image_embeds)
    assert all(torch.equal(loaded.images[name], fresh.images[name]) for name in fresh.images)
    queries = [split[i]["caption"] for i in (2, 90, 199)]
    assert loaded.search(queries, top_k=4) == fresh.search(queries, top_k=4)
    with open(tmp_path / "index.safetensors", "rb") as handle:
        assert handle.read(4) != b"PK\x03\x04"  # safetensors (a JSON header), not a pickle-based torch file


@needs_faiss
def test_the_loading_retrievers_search_options_apply(model, processor, split, tmp_path):
    ImageBertRetriever(model, processor, index_type="ivf", index_options={"nlist": 4, "nprobe": 1}).index(
        split
    ).save_index(tmp_path / "index.safetensors")
    loaded = ImageBertRetriever(model, processor, index_type="ivf", index_options={"nprobe": 4})
    loaded.load_index(tmp_path / "index.safetensors")
    assert loaded.vector_index.options.nprobe == 4 and loaded.vector_index.faiss_index.nprobe == 4
    assert loaded.vector_index.options.nlist == 4


@needs_faiss
def test_a_saved_index_refuses_each_setting_that_differs_in_one_line(
    model, processor, split, tmp_path, minilm_path
):
    from transformers import BertTokenizerFast

    path = tmp_path / "index.safetensors"
    saved = ImageBertRetriever(model, processor, index_type="ivf", index_options={"nlist": 4}).index(split)
    saved.save_index(path)
    config = tiny_config()
    tokenizer = BertTokenizerFast.from_pretrained(minilm_path)

    def other_processor(**overrides):
        settings = {"max_regions": config.max_regions, "max_text_length": config.max_text_length, **overrides}
        return ImageBertProcessor(tokenizer, **settings)

    other_weights = tiny_model(ImageBertForRetrieval, seed=9)
    dim = model.config.projection_dim
    cases = [
        (
            ImageBertRetriever(other_weights, processor, index_type="ivf"),
            {},
            "the index was built with other model weights or config",
        ),
        (
            ImageBertRetriever(tiny_model(ImageBertForRetrieval, seed=3, projection_dim=16), processor),
            {},
            f"embedding dimension differs: the index holds {dim}-d embeddings, the model's projection_dim is 16",
        ),
        (
            ImageBertRetriever(model, other_processor(max_regions=config.max_regions - 1), index_type="ivf"),
            {},
            f"processor setting max_regions differs: the index was built with max_regions={config.max_regions}",
        ),
        (
            ImageBertRetriever(model, other_processor(max_text_length=12), index_type="ivf"),
            {},
            "processor setting max_text_length differs",
        ),
        (ImageBertRetriever(model, processor), {}, "index type differs: the index is 'ivf'"),
        (ImageBertRetriever(model, processor, index_type="hnsw"), {}, "index type differs"),
        (
            ImageBertRetriever(model, processor, index_type="ivf", index_options={"nlist": 2}),
            {},
            "index option nlist differs: the index was built with nlist=4, this retriever asks for nlist=2",
        ),
        (
            ImageBertRetriever(model, processor, index_type="ivf"),
            {"image_ids": list(reversed(saved.image_ids))},
            "image ids differ",
        ),
    ]
    for retriever, kwargs, message in cases:
        with pytest.raises(ValueError, match=message) as error:
            retriever.load_index(path, **kwargs)
        assert "\n" not in str(error.value)
    ImageBertRetriever(model, processor, index_type="ivf").load_index(
        path, image_ids=saved.image_ids
    )  # accepted

    torch.save({"format": 1, "image_ids": ["a"]}, tmp_path / "old.pt")  # the format earlier versions wrote
    with pytest.raises(ValueError, match="an index written by an earlier version"):
        ImageBertRetriever(model, processor).load_index(tmp_path / "old.pt")
    (tmp_path / "junk.safetensors").write_bytes(os.urandom(64))
    with pytest.raises(ValueError, match="not an ImageBertRetriever index"):
        ImageBertRetriever(model, processor).load_index(tmp_path / "junk.safetensors")


# ----------------------------------------------------------------------------------------------------------------------
# From image files
# ----------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    return write_photos(tmp_path_factory.mktemp("photos"), size=64)


@pytest.fixture(scope="module")
def image_model():
    return tiny_model(ImageBertForRetrieval, seed=MODEL_SEED).eval()


def test_index_images_goes_through_detect_regions_and_indexes_as_index_does(photos, image_model, minilm_path):
    processor = stand_in_processor(minilm_path, image_model.config)
    files = sorted(photos.glob("*.jpg"))
    one_batch = ImageBertRetriever(image_model, processor).index_images(
        photos, batch_size=100, progress=False
    )
    assert one_batch.image_ids == [path.stem for path in files]
    records = processor.detect_regions([str(path) for path in files], image_ids=one_batch.image_ids)
    reference = ImageBertRetriever(image_model, processor).index(records)
    assert reference.image_ids == one_batch.image_ids
    assert all(torch.equal(one_batch.images[name], reference.images[name]) for name in reference.images)
    assert torch.equal(one_batch.image_embeds, reference.image_embeds)
    batched = ImageBertRetriever(image_model, processor).index_images(files, batch_size=3, progress=False)
    assert all(torch.equal(batched.images[name], reference.images[name]) for name in reference.images)
    torch.testing.assert_close(batched.image_embeds, reference.image_embeds)  # other padding per batch
    assert batched.search("a cat on a sofa", top_k=3)[0][0].image_id in batched.image_ids
    with pytest.raises(ValueError, match=f"duplicate image_id '{files[0].stem}'"):
        ImageBertRetriever(image_model, processor).index_images([files[0], files[0]], progress=False)


def test_index_images_without_a_detector_says_what_is_missing(photos, image_model, processor):
    with pytest.raises(TypeError, match="index_images needs a processor with a detector"):
        ImageBertRetriever(image_model, processor).index_images(photos, progress=False)


def test_index_images_stopped_by_an_error_resumes_from_its_cache(photos, image_model, minilm_path, tmp_path):
    straight = ImageBertRetriever(image_model, stand_in_processor(minilm_path, image_model.config))
    straight.index_images(photos, batch_size=2, progress=False)
    failing = stand_in_processor(minilm_path, image_model.config)
    detect = failing.detect_regions

    def detect_then_fail(images, image_ids=None):
        if len(getattr(failing, "calls", [])) == 2:
            raise RuntimeError("the detector fell over")
        return detect(images, image_ids=image_ids)

    failing.detect_regions = detect_then_fail
    with pytest.raises(RuntimeError, match="fell over"):
        ImageBertRetriever(image_model, failing).index_images(
            photos, batch_size=2, cache_dir=tmp_path, progress=False
        )
    processor = stand_in_processor(minilm_path, image_model.config)
    resumed = ImageBertRetriever(image_model, processor)
    resumed.index_images(photos, batch_size=2, cache_dir=tmp_path, progress=False)
    assert len(processor.calls) == 2  # 8 photos in batches of 2: the first two batches came from the cache
    assert resumed.image_ids == straight.image_ids
    assert torch.equal(resumed.image_embeds, straight.image_embeds)
    assert all(torch.equal(resumed.images[name], straight.images[name]) for name in straight.images)


def test_index_images_killed_at_a_random_moment_resumes_to_the_same_index(
    photos, image_model, minilm_path, tmp_path
):
    seed = int(os.environ.get("IMAGEBERT_KILL_SEED", time.time_ns() % 2**32))
    rng = random.Random(seed)
    cache = tmp_path / "cache"
    seconds_per_image = 0.25
    command = [sys.executable, str(REPO / "tests" / "detector_double.py"), minilm_path, str(photos), str(cache),
               str(seconds_per_image)]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}
    code, stderr = kill_at_random_moment(
        command,
        started=lambda: any(cache.glob("index-images-*/batch-*.safetensors")),
        seconds=8 * seconds_per_image,
        rng=rng,
        env=env,
        cwd=REPO,
    )
    assert code in (-signal.SIGKILL, 0), f"seed {seed}: {stderr}"
    written = sorted(cache.glob("index-images-*/batch-*.safetensors"))
    assert 1 <= len(written) <= 8, seed
    processor = stand_in_processor(minilm_path, image_model.config)
    resumed = ImageBertRetriever(image_model, processor)
    resumed.index_images(photos, batch_size=1, cache_dir=cache, progress=False)
    assert len(getattr(processor, "calls", [])) == 8 - len(written), seed  # only the missing batches ran
    straight = ImageBertRetriever(image_model, stand_in_processor(minilm_path, image_model.config))
    straight.index_images(photos, batch_size=1, progress=False)
    resumed.save_index(tmp_path / "resumed.safetensors")
    straight.save_index(tmp_path / "straight.safetensors")
    # The same tensors and settings (the files' bytes may differ: safetensors writes its metadata map in a
    # random order).
    from safetensors import safe_open
    from safetensors.torch import load_file

    saved = [tmp_path / "resumed.safetensors", tmp_path / "straight.safetensors"]
    resumed_tensors, straight_tensors = (load_file(str(path)) for path in saved)
    assert resumed_tensors.keys() == straight_tensors.keys()
    assert all(torch.equal(resumed_tensors[name], straight_tensors[name]) for name in straight_tensors), seed
    with safe_open(str(saved[0]), "pt") as first, safe_open(str(saved[1]), "pt") as second:
        assert first.metadata() == second.metadata()
