"""The search app's engine (no browser): text search ranks by ITM among the ITC shortlist and reports its time
split, image search finds captions and similar images, the boxes come from the detector, the index resumes from
its cache, the image folder is never written to, and a folder it cannot read is refused in one line."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from app_fixture import build_toy_app, demo_class_names, snapshot

from modeling_imagebert.app.search import SearchApp, check_cache_dir, check_image_folder
from modeling_imagebert.app.toy_demo import ToyWorldProcessor, demo_split, draw_scene


@pytest.fixture(scope="module")
def toy(tmp_path_factory, minilm_path):
    root = tmp_path_factory.mktemp("app")
    app, images, captions, model = build_toy_app(root, minilm_path)
    return app, images, captions, model, root


def test_text_search_returns_ranked_ids_with_both_scores_and_the_time_split(toy):
    app = toy[0]
    result = app.search_text("a red dog next to a blue cat", top_k=8)
    assert len(result.hits) == 8
    assert set(result.timings) == {"embed", "search", "rerank"}
    assert all(seconds >= 0 for seconds in result.timings.values())
    logits = [hit.itm_logit for hit in result.hits]
    assert logits == sorted(logits, reverse=True)  # stage 2 sets the order
    assert all(0 < hit.itm_probability < 1 and -1 <= hit.similarity <= 1 for hit in result.hits)
    # The same ids and scores as the retriever itself: the app adds no ranking of its own.
    direct = app.retriever.search(["a red dog next to a blue cat"], top_k=8)[0]
    assert [(h.image_id, h.itm_logit, h.similarity) for h in result.hits] == [
        (h.image_id, h.score, h.similarity) for h in direct
    ]
    assert all(Path(hit.path).name == f"{hit.image_id}.png" for hit in result.hits)


def test_the_shortlist_is_the_itc_top_k_and_the_order_is_by_itm(toy):
    app = toy[0]
    app.retriever.candidates = 4
    try:
        hits = app.search_text("a green car", top_k=4).hits
    finally:
        app.retriever.candidates = 16
    text = app.retriever.processor(text=["a green car"])
    from modeling_imagebert.retrieval.two_stage import embed_texts

    query = embed_texts(app.retriever.model, {k: text[k] for k in ("input_ids", "attention_mask")})
    cosine = (query @ app.retriever.image_embeds.T)[0]
    shortlist = {app.retriever.image_ids[i] for i in cosine.topk(4).indices.tolist()}
    assert {hit.image_id for hit in hits} == shortlist


def test_retriever_search_reports_embed_search_and_rerank_seconds(toy):
    timings = {}
    toy[0].retriever.search(["a cat"], top_k=3, timings=timings)
    assert sorted(timings) == ["embed", "rerank", "search"]


def test_image_search_ranks_captions_by_itm_and_an_upload_equals_the_indexed_image(toy):
    app = toy[0]
    image_id = app.retriever.image_ids[3]
    by_id = app.search_captions(image_id, top_k=5)
    by_file = app.search_captions(app.paths[image_id], top_k=5)  # detected again from the PNG
    assert [h.caption for h in by_id.hits] == [h.caption for h in by_file.hits]
    assert torch.allclose(
        torch.tensor([h.itm_logit for h in by_id.hits]),
        torch.tensor([h.itm_logit for h in by_file.hits]),
        atol=1e-5,
    )
    logits = [h.itm_logit for h in by_id.hits]
    assert logits == sorted(logits, reverse=True) and len(by_id.hits) == 5
    assert set(by_file.timings) == {"embed", "search", "rerank"}


def test_similar_images_leave_out_the_query_image(toy):
    app = toy[0]
    image_id = app.retriever.image_ids[0]
    hits = app.similar_images(image_id, top_k=5).hits
    assert len(hits) == 5 and image_id not in {h.image_id for h in hits}
    similarities = [h.similarity for h in hits]
    assert similarities == sorted(similarities, reverse=True)


def test_boxes_are_the_detectors_top_regions_with_class_names(toy):
    app = toy[0]
    image_id = app.retriever.image_ids[0]
    picture, labels = app.draw_regions(image_id)
    record = app.detect(image_id)
    assert len(labels) == len(record["region_boxes"]) <= app.retriever.processor.max_regions
    assert {label for label, _ in labels} <= set(demo_class_names())
    scores = [score for _, score in labels]
    assert scores == sorted(scores, reverse=True)
    with __import__("PIL.Image").Image.open(app.paths[image_id]) as plain:
        assert picture.size == plain.size and picture.tobytes() != plain.convert("RGB").tobytes()


def test_the_demo_detector_refuses_a_picture_it_did_not_draw(toy, tmp_path):
    app = toy[0]
    other = tmp_path / "other.png"
    draw_scene(320, 320, [("dog", "red", [10, 10, 100, 100])]).save(other)
    with pytest.raises(ValueError, match="not one of the demo's drawn toy scenes"):
        app.search_captions(other)


def test_the_index_resumes_from_its_cache_without_detecting_again(toy, monkeypatch, minilm_path):
    _, images, captions, model, root = toy
    calls = []
    original = ToyWorldProcessor.detect_regions
    monkeypatch.setattr(
        ToyWorldProcessor, "detect_regions", lambda self, *a, **k: calls.append(1) or original(self, *a, **k)
    )
    again, *_ = build_toy_app(root, minilm_path, model=model)
    assert calls == []  # every batch came from the cache
    assert torch.equal(again.retriever.image_embeds, toy[0].retriever.image_embeds)


def test_the_app_never_writes_inside_the_image_folder(tmp_path, minilm_path):
    app, images, *_ = build_toy_app(tmp_path, minilm_path)
    before = snapshot(images)
    app, *_ = build_toy_app(
        tmp_path, minilm_path
    )  # the scenes are kept, the index is read back from the cache
    image_id = app.retriever.image_ids[1]
    app.search_text("a black cat")
    app.search_captions(image_id)
    app.search_captions(app.paths[image_id])
    app.similar_images(app.paths[image_id])
    app.draw_regions(image_id)
    assert snapshot(images) == before
    assert any((tmp_path / "index").rglob("*.safetensors"))  # the index went to the cache folder


def test_a_cache_inside_the_image_folder_is_refused(tmp_path):
    (tmp_path / "photos").mkdir()
    with pytest.raises(ValueError, match="inside the image folder"):
        check_cache_dir(tmp_path / "photos" / "cache", tmp_path / "photos")
    assert check_cache_dir(tmp_path / "cache", tmp_path / "photos") == tmp_path / "cache"


def test_folders_it_cannot_read_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such folder"):
        check_image_folder(tmp_path / "missing")
    (tmp_path / "file.png").write_bytes(b"")
    with pytest.raises(NotADirectoryError, match="not a folder"):
        check_image_folder(tmp_path / "file.png")
    if os.geteuid() != 0:  # root reads any folder
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o000)
        try:
            with pytest.raises(PermissionError, match="cannot read this folder"):
                check_image_folder(locked)
        finally:
            locked.chmod(0o755)


@pytest.mark.parametrize("kind", ["missing", "file", "empty"])
def test_the_command_refuses_a_folder_it_cannot_read_with_one_line(tmp_path, kind, toy, capsys):
    from modeling_imagebert.app.__main__ import main
    from modeling_imagebert.cli import run_cli

    folder = tmp_path / "photos"
    if kind == "file":
        folder.write_bytes(b"not a folder")
    elif kind == "empty":
        folder.mkdir()
    argv = ["--model", str(toy[3]), "--images", str(folder), "--cache", str(tmp_path / "cache")]
    assert run_cli(main, argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(folder) in lines[0], lines
    assert not (tmp_path / "cache").exists()


def test_python_m_app_refuses_a_missing_folder_with_one_line_and_exit_status_2(tmp_path, toy):
    run = subprocess.run(
        [sys.executable, "-m", "modeling_imagebert.app", "--model", str(toy[3]), "--images", str(tmp_path / "no")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 2, run.stderr
    assert run.stderr.strip().splitlines() == [
        f"error: --images {tmp_path / 'no'}: no such folder ; check the path (rerun with --debug for the traceback)"
    ]


def test_the_demo_split_is_the_demos_held_out_test_split():
    split = demo_split()
    assert split.num_rows == 125 and len(set(split["image_id"])) == 25
    assert isinstance(SearchApp, type)


def test_demo_prepares_the_drawn_scenes_captions_and_class_names(toy, tmp_path):
    from modeling_imagebert.app.__main__ import build_argument_parser, prepare

    args = build_argument_parser().parse_args(["--demo", "--model", str(toy[3]), "--cache", str(tmp_path)])
    app, folder = prepare(args)
    assert folder == tmp_path / "toy-scenes" / "images" and len(app.paths) == 25 and len(app.captions) == 125
    assert app.class_name(0) == "dog" and app.class_name(12) == "background"
    assert args.host == "127.0.0.1"  # this machine only, unless asked


def test_the_demo_finds_its_model_in_the_cache_then_make_demos_output(tmp_path, monkeypatch):
    from modeling_imagebert.app.toy_demo import find_demo_model, train_demo_model

    monkeypatch.chdir(tmp_path)  # no checkout here: no examples/run_pretrain.py
    assert find_demo_model(tmp_path / "cache") is None
    with pytest.raises(FileNotFoundError, match="run `make demo`"):
        train_demo_model(tmp_path / "cache")
    made = tmp_path / "outputs" / "imagebert-demo" / "final"
    made.mkdir(parents=True)
    (made / "config.json").write_text("{}")
    assert find_demo_model(tmp_path / "cache") == Path("outputs/imagebert-demo/final")
    cached = tmp_path / "cache" / "demo-model" / "final"
    cached.mkdir(parents=True)
    (cached / "config.json").write_text("{}")
    assert find_demo_model(tmp_path / "cache") == cached
