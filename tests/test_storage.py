import json
import subprocess
import sys
import textwrap
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from accelerate.data_loader import prepare_data_loader

from modeling_imagebert.data import storage
from modeling_imagebert.data.schema import DataValidationError, image_text_features
from modeling_imagebert.data.storage import (
    check_not_double_sharded,
    dataloader_kwargs_for_accelerate,
    load_dataset_from_disk,
    load_streaming_dataset,
    save_dataset,
)

F = 4


def make_dataset(num_rows: int, num_regions: int = 3, seed: int = 0, first_features=None) -> datasets.Dataset:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(num_rows):
        n = (i + num_regions) % (num_regions + 1)  # some rows have no regions
        if i == 0 and first_features is not None:
            n = len(first_features)
        rows.append(
            {
                "image_id": f"img-{i}",
                "caption": f"caption number {i}",
                "region_features": rng.standard_normal((n, F)).astype(np.float16)
                if i or first_features is None
                else first_features,
                "region_boxes": np.tile(np.array([[1, 2, 30, 40]], np.float32), (n, 1)),
                "image_width": 64,
                "image_height": 48,
                "region_classes": list(range(n)),
                "region_scores": [0.5] * n,
            }
        )
    return datasets.Dataset.from_list(rows, features=image_text_features(F))


def leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# ---------------------------------------------------------------------------------------------------------------
# Save and load


def test_round_trip_keeps_float16_features_bit_exact(tmp_path):
    special = np.array([[6.0e-8, -0.0, 65504.0, -65504.0], [np.nan, np.inf, 1e-3, 1 / 3]], np.float16)
    dataset = make_dataset(6, first_features=special[:1])  # subnormal, negative zero, extremes
    save_dataset(dataset, tmp_path / "ds", num_shards=2)
    loaded = load_dataset_from_disk(tmp_path / "ds")
    assert loaded.features == dataset.features
    before, after = dataset.with_format("numpy", dtype=None), loaded.with_format("numpy", dtype=None)
    for i in range(len(dataset)):
        assert after[i]["region_features"].dtype == np.float16
        np.testing.assert_array_equal(
            after[i]["region_features"].view(np.uint16), before[i]["region_features"].view(np.uint16)
        )
        assert after[i]["image_id"] == before[i]["image_id"]
    assert len(list((tmp_path / "ds").glob("data-*.arrow"))) == 2


def test_save_refuses_to_replace_an_existing_dataset_without_overwrite(tmp_path):
    save_dataset(make_dataset(3), tmp_path / "ds")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_dataset(make_dataset(5), tmp_path / "ds")
    assert len(load_dataset_from_disk(tmp_path / "ds")) == 3
    save_dataset(make_dataset(5), tmp_path / "ds", overwrite=True)
    assert len(load_dataset_from_disk(tmp_path / "ds")) == 5
    assert leftovers(tmp_path) == []


def test_save_validates_records_before_writing_anything(tmp_path):
    dataset = make_dataset(4)
    rows = [dataset[i] for i in range(4)]
    rows[2]["caption"] = " "
    with pytest.raises(DataValidationError, match=r"record 2 \(image_id='img-2'\), field 'caption'"):
        save_dataset(datasets.Dataset.from_list(rows, features=dataset.features), tmp_path / "ds")
    assert list(tmp_path.iterdir()) == []


def _failing_save_to_disk(self, dataset_path, **kwargs):
    """Writes part of a dataset, then dies as an interrupted save would."""
    with open(f"{dataset_path}/data-00000-of-00002.arrow", "wb") as f:
        f.write(b"half a shard")
    raise KeyboardInterrupt("simulated interruption")


def test_interrupted_save_leaves_no_target_and_no_temporary_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.Dataset, "save_to_disk", _failing_save_to_disk)
    with pytest.raises(KeyboardInterrupt):
        save_dataset(make_dataset(3), tmp_path / "ds")
    assert list(tmp_path.iterdir()) == []


def test_interrupted_overwrite_leaves_the_previous_dataset_unchanged(tmp_path, monkeypatch):
    save_dataset(make_dataset(3), tmp_path / "ds")
    monkeypatch.setattr(datasets.Dataset, "save_to_disk", _failing_save_to_disk)
    with pytest.raises(KeyboardInterrupt):
        save_dataset(make_dataset(5), tmp_path / "ds", overwrite=True)
    assert len(load_dataset_from_disk(tmp_path / "ds")) == 3
    assert leftovers(tmp_path) == []


def test_failure_while_swapping_in_the_new_dataset_restores_the_previous_one(tmp_path, monkeypatch):
    save_dataset(make_dataset(3), tmp_path / "ds")
    real_rename, calls = storage.os.rename, []

    def rename(src, dst):
        calls.append(dst)
        if len(calls) == 2:  # the old dataset has been moved aside; moving the new one in fails
            raise OSError("simulated failure")
        real_rename(src, dst)

    monkeypatch.setattr(storage.os, "rename", rename)
    with pytest.raises(OSError, match="simulated"):
        save_dataset(make_dataset(5), tmp_path / "ds", overwrite=True)
    monkeypatch.undo()
    assert len(load_dataset_from_disk(tmp_path / "ds")) == 3
    assert leftovers(tmp_path) == []


def test_load_names_a_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_dataset_from_disk(tmp_path / "nowhere")


def test_load_rejects_a_folder_that_is_not_a_saved_dataset(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(DataValidationError, match="is not a saved dataset"):
        load_dataset_from_disk(tmp_path)


def test_load_rejects_a_dataset_dict_and_names_its_splits(tmp_path):
    datasets.DatasetDict({"train": make_dataset(2)}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DataValidationError, match=r"DatasetDict \(splits \['train'\]\)"):
        load_dataset_from_disk(tmp_path / "dd")


def test_load_names_the_column_that_does_not_match_the_schema(tmp_path):
    make_dataset(2).remove_columns("region_scores").save_to_disk(str(tmp_path / "a"))
    with pytest.raises(DataValidationError, match="column 'region_scores' is missing"):
        load_dataset_from_disk(tmp_path / "a")
    upcast = make_dataset(2).cast_column("region_features", datasets.Array2D((None, F), "float32"))
    upcast.save_to_disk(str(tmp_path / "b"))
    with pytest.raises(DataValidationError, match="column 'region_features' has type"):
        load_dataset_from_disk(tmp_path / "b")
    with pytest.raises(DataValidationError, match="column 'region_features'"):
        save_dataset(upcast, tmp_path / "c")


MEMORY_MAP_PROBE = textwrap.dedent(
    """
    import json, sys, types
    import datasets, numpy as np, psutil

    # Skip the package __init__ (torch, transformers): seconds of start-up this probe does not need.
    package = types.ModuleType("modeling_imagebert")
    package.__path__ = [sys.argv[2]]
    sys.modules["modeling_imagebert"] = package
    from modeling_imagebert.data.storage import load_dataset_from_disk

    process = psutil.Process()

    def anonymous_rss():
        # Pages of a memory-mapped file count in RSS as shared file pages and can be dropped by the kernel at any
        # time; anonymous (heap) memory is what loading a dataset into RAM would cost.
        info = process.memory_info()
        return info.rss - info.shared

    def iterate(dataset):
        start, peak, total, rows = anonymous_rss(), 0, 0, 0
        for batch in dataset.with_format("numpy", dtype=None).iter(batch_size=16):
            rows += len(batch["region_features"])
            total += int(np.stack(list(batch["region_features"])).view(np.uint16).sum(dtype=np.int64))
            peak = max(peak, anonymous_rss() - start)
        return peak, total, rows

    base = anonymous_rss()
    mapped = load_dataset_from_disk(sys.argv[1])
    load_growth = anonymous_rss() - base
    mapped_peak, total, rows = iterate(mapped)
    base = anonymous_rss()
    in_memory = datasets.load_from_disk(sys.argv[1], keep_in_memory=True)
    in_memory_growth = anonymous_rss() - base
    print(json.dumps({"load": load_growth, "iterate": mapped_peak, "in_memory": in_memory_growth, "total": total, "rows": rows}))
    """
)


def test_loaded_dataset_is_memory_mapped_not_read_into_ram(tmp_path):
    num_rows, num_regions, dim = 320, 100, 1000  # 64 MB of float16 features
    bits = np.random.default_rng(0).integers(0, 2**16, (num_rows, num_regions, dim), dtype=np.uint16)
    features = (bits & 0xFBFF).view(np.float16)  # random finite float16 values (exponent never all ones)
    dataset = datasets.Dataset.from_dict(
        {
            "image_id": [f"img-{i}" for i in range(num_rows)],
            "caption": ["a caption"] * num_rows,
            "region_features": features,
            "region_boxes": np.tile(np.array([0, 0, 1, 1], np.float32), (num_rows, num_regions, 1)),
            "image_width": [8] * num_rows,
            "image_height": [8] * num_rows,
            "region_classes": np.zeros((num_rows, num_regions), np.int32),
            "region_scores": np.full((num_rows, num_regions), 0.5, np.float32),
        },
        features=image_text_features(dim),
    )
    size = features.nbytes
    save_dataset(dataset, tmp_path / "big", validate=False, max_shard_size="32MB")
    del dataset
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            MEMORY_MAP_PROBE,
            str(tmp_path / "big"),
            str(Path(storage.__file__).parents[1]),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    growth = json.loads(result.stdout.strip().splitlines()[-1])
    assert growth["rows"] == num_rows  # every row was read, and its values
    assert growth["total"] == int(features.view(np.uint16).sum(dtype=np.int64))  # a bit-exact checksum
    assert growth["in_memory"] > 0.8 * size, (growth, size)  # the probe does see a dataset read into RAM
    assert growth["load"] < 0.05 * size, (growth, size)
    assert growth["iterate"] < 0.4 * size, (growth, size)


# ---------------------------------------------------------------------------------------------------------------
# Streaming


def stream_ids(path, **kwargs):
    return [row["image_id"] for row in load_streaming_dataset(path, format=None, **kwargs)]


@pytest.mark.parametrize(
    "num_rows,saved_shards,world_size",
    [(13, 3, 2), (12, 2, 3), (5, 1, 4)],
    ids=["two", "three", "uneven"],
)
def test_ranks_stream_disjoint_rows_that_cover_the_dataset_once(tmp_path, num_rows, saved_shards, world_size):
    save_dataset(make_dataset(num_rows), tmp_path / "ds", num_shards=saved_shards)
    parts = [stream_ids(tmp_path / "ds", rank=r, world_size=world_size) for r in range(world_size)]
    everything = [i for part in parts for i in part]
    assert sorted(everything) == sorted(f"img-{i}" for i in range(num_rows))  # disjoint and complete
    sizes = [len(part) for part in parts]
    assert max(sizes) - min(sizes) <= 1  # balanced


def test_streaming_to_more_processes_than_rows_is_rejected(tmp_path):
    save_dataset(make_dataset(3), tmp_path / "ds")
    with pytest.raises(ValueError, match="3 rows, fewer than world_size=4"):
        load_streaming_dataset(tmp_path / "ds", rank=3, world_size=4)


def test_shuffled_ranks_stay_disjoint_and_complete_with_different_orders_per_epoch(tmp_path):
    save_dataset(make_dataset(40), tmp_path / "ds", num_shards=4)
    plain = stream_ids(tmp_path / "ds", rank=0, world_size=2)
    parts = []
    for rank in range(2):
        stream = load_streaming_dataset(
            tmp_path / "ds", rank=rank, world_size=2, shuffle_buffer=8, seed=rank, format=None
        )
        epoch0 = [row["image_id"] for row in stream]
        stream.set_epoch(1)
        epoch1 = [row["image_id"] for row in stream]
        assert sorted(epoch0) == sorted(epoch1) and epoch0 != epoch1
        parts.append(epoch0)
    assert parts[0] != plain and sorted(parts[0]) == sorted(plain)
    assert sorted(parts[0] + parts[1]) == sorted(f"img-{i}" for i in range(40))


def test_streamed_numpy_features_recover_the_stored_float16_exactly(tmp_path):
    dataset = make_dataset(5)
    save_dataset(dataset, tmp_path / "ds")
    stored = dataset.with_format("numpy", dtype=None)
    for i, row in enumerate(load_streaming_dataset(tmp_path / "ds", rank=0, world_size=1)):
        assert row["image_id"] == f"img-{i}"
        np.testing.assert_array_equal(
            np.asarray(row["region_features"]).astype(np.float16).view(np.uint16),
            stored[i]["region_features"].view(np.uint16),
        )


def test_rank_and_world_size_default_to_the_accelerate_process(tmp_path, monkeypatch):
    save_dataset(make_dataset(10), tmp_path / "ds", num_shards=2)
    monkeypatch.setattr(storage, "_current_process", lambda: (1, 2))
    assert stream_ids(tmp_path / "ds") == stream_ids(tmp_path / "ds", rank=1, world_size=2)
    assert len(stream_ids(tmp_path / "ds")) == 5


def test_without_an_initialised_accelerate_state_nothing_is_split(monkeypatch):
    from accelerate import PartialState

    monkeypatch.setattr(PartialState, "_shared_state", {})
    assert storage._current_process() == (0, 1)


@pytest.mark.parametrize("kwargs", [{"rank": 0}, {"rank": 2, "world_size": 2}, {"rank": 0, "world_size": 0}])
def test_invalid_rank_or_world_size_is_rejected(tmp_path, kwargs):
    with pytest.raises(ValueError, match="rank"):
        load_streaming_dataset(tmp_path, **kwargs)


def collate_ids(rows):
    return [row["image_id"] for row in rows]


def test_accelerate_would_split_an_already_split_stream_again_and_the_check_catches_it(tmp_path):
    save_dataset(make_dataset(13), tmp_path / "ds", num_shards=3)
    seen = []
    for rank in range(2):
        stream = load_streaming_dataset(tmp_path / "ds", rank=rank, world_size=2, format=None)
        loader = torch.utils.data.DataLoader(stream, batch_size=2, collate_fn=collate_ids)
        check_not_double_sharded(loader, num_processes=2)  # a plain loader is fine
        prepared = prepare_data_loader(
            loader,
            num_processes=2,
            process_index=rank,
            put_on_device=False,
            **dataloader_kwargs_for_accelerate(),
        )
        seen += [i for batch in prepared for i in batch]
        with pytest.raises(ValueError, match="splits it again"):
            check_not_double_sharded(prepared, num_processes=2)
    assert len(seen) < 13  # double sharding loses rows: the reason for the check


def test_an_unsplit_stream_prepared_with_our_accelerate_kwargs_covers_the_dataset_once(tmp_path):
    save_dataset(make_dataset(13), tmp_path / "ds", num_shards=3)
    seen = []
    for rank in range(2):
        stream = load_streaming_dataset(tmp_path / "ds", rank=0, world_size=1, format=None)
        loader = torch.utils.data.DataLoader(stream, batch_size=2, collate_fn=collate_ids)
        prepared = prepare_data_loader(
            loader,
            num_processes=2,
            process_index=rank,
            put_on_device=False,
            **dataloader_kwargs_for_accelerate(),
        )
        check_not_double_sharded(prepared, num_processes=2)
        seen += [i for batch in prepared for i in batch]
    assert sorted(seen) == sorted(f"img-{i}" for i in range(13))


def test_saved_folder_layout_is_what_load_expects(tmp_path):
    save_dataset(make_dataset(3), tmp_path / "ds")
    state = json.loads((tmp_path / "ds" / "state.json").read_text())
    assert [f["filename"] for f in state["_data_files"]] == ["data-00000-of-00001.arrow"]


def test_a_truncated_arrow_shard_is_named_with_its_folder_not_an_arrow_internal_error(tmp_path):
    save_dataset(make_dataset(3), tmp_path / "ds")
    (shard,) = (tmp_path / "ds").glob("data-*.arrow")
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(
        DataValidationError, match=r"dataset at .*ds: cannot be read .* write the dataset again"
    ):
        load_dataset_from_disk(tmp_path / "ds")


def test_saved_dataset_carries_our_marker_and_overwrite_refuses_a_folder_without_it(tmp_path):
    from modeling_imagebert.atomic import UnsafeRemovalError, read_marker

    save_dataset(make_dataset(2), tmp_path / "ds")
    assert read_marker(tmp_path / "ds")["written_by"].endswith("save_dataset")
    save_dataset(make_dataset(3), tmp_path / "ds", overwrite=True)
    assert len(load_dataset_from_disk(tmp_path / "ds")) == 3
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("years of work")
    with pytest.raises(UnsafeRemovalError, match="marker"):
        save_dataset(make_dataset(2), tmp_path / "mine", overwrite=True)
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "years of work"
