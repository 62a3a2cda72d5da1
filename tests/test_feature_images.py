"""Image decoding (every bad-image case) and the four image sources."""

import json
import tarfile

import numpy as np
import pytest
from feature_fixtures import BOMB_LIMIT, EXPECTED_SKIPS, bad_image_files, photo, write_photos
from PIL import Image

from modeling_imagebert.features.images import decode_image, read_image_size
from modeling_imagebert.features.sources import ImageSourceError, list_images


@pytest.fixture(scope="module")
def bad_files():
    return bad_image_files()


def test_every_bad_image_case_is_converted_or_skipped_with_its_reason(bad_files):
    for name, payload in bad_files.items():
        result = decode_image(payload, max_pixels=BOMB_LIMIT)
        stem = name.split(".")[0]
        if stem in EXPECTED_SKIPS:
            assert not result.ok and result.reason == EXPECTED_SKIPS[stem], (
                name,
                result.reason,
                result.message,
            )
            assert result.image is None and result.message and "\n" not in result.message
        else:
            assert result.ok, (name, result.reason, result.message)
            assert result.image.dtype == np.uint8 and result.image.ndim == 3 and result.image.shape[2] == 3, (
                name
            )


def test_converted_images_keep_the_picture(bad_files):
    reference = decode_image(bad_files["good.jpg"]).image.astype(np.int16)
    original = Image.fromarray(photo("astronaut")).resize((96, 96))  # what bad_image_files encoded
    gray_reference = np.asarray(original.convert("L"), dtype=np.int16)
    # colour conversions stay close to the RGB JPEG (JPEG noise only)
    for name in ("cmyk.jpg", "rgba.png", "palette.png"):
        image = decode_image(bad_files[name]).image.astype(np.int16)
        assert np.abs(image - reference).mean() < 12, name
    # 16-bit data is scaled to 8 bits (65535 -> 255), not clipped at 255 (which would turn it white)
    sixteen = decode_image(bad_files["sixteen_bit.png"])
    assert sixteen.original_mode.startswith("I")
    assert np.array_equal(sixteen.image[..., 0].astype(np.int16), gray_reference)
    assert (sixteen.image[..., 0] == sixteen.image[..., 2]).all()
    # grayscale and LA become three equal channels
    for name in ("grayscale.jpg", "la.png"):
        image = decode_image(bad_files[name]).image
        assert (image[..., 0] == image[..., 1]).all() and (image[..., 1] == image[..., 2]).all(), name


def test_transparent_pixels_become_white():
    rgba = np.zeros((20, 20, 4), dtype=np.uint8)
    rgba[..., 0] = 200
    rgba[:10, :, 3] = 255  # top half opaque red, bottom half fully transparent
    buffer = Image.fromarray(rgba, "RGBA")
    from feature_fixtures import encode

    image = decode_image(encode(buffer, "PNG")).image
    assert (image[:10] == [200, 0, 0]).all()
    assert (image[10:] == 255).all()


def test_exif_orientation_is_applied_to_pixels_and_header_size(bad_files):
    payload = bad_files["exif_rotated.jpg"]
    stored = Image.open(__import__("io").BytesIO(payload)).size
    assert stored == (192, 96)
    image = decode_image(payload).image
    assert image.shape[:2] == (192, 96)  # (H, W): shown portrait
    assert read_image_size(payload) == (96, 192)  # (W, H)


def test_pixel_limit_is_an_option(bad_files):
    before = Image.MAX_IMAGE_PIXELS
    assert decode_image(bad_files["bomb.png"], max_pixels=BOMB_LIMIT).reason == "decompression_bomb"
    assert decode_image(bad_files["bomb.png"], max_pixels=None).ok
    assert decode_image(bad_files["bomb.png"]).ok  # PIL's default limit is far higher
    assert Image.MAX_IMAGE_PIXELS == before  # PIL's global limit is restored


def test_missing_file_is_a_skip_not_an_exception(tmp_path):
    result = decode_image(tmp_path / "nope.jpg")
    assert result.reason == "unreadable" and "No such file" in result.message


# --------------------------------------------------------------------------------------------------------------
# sources
# --------------------------------------------------------------------------------------------------------------


def test_folder_source_is_recursive_sorted_and_skips_hidden_and_other_files(tmp_path):
    write_photos(tmp_path / "b", ["coffee"])
    write_photos(tmp_path / "a" / "deep", ["astronaut", "chelsea"])
    write_photos(tmp_path / ".hidden", ["rocket"])
    (tmp_path / "notes.txt").write_text("not an image")
    refs = list_images("folder", [tmp_path])
    assert [ref.image_id for ref in refs] == ["astronaut", "chelsea", "coffee"]
    relative = list_images("folder", [tmp_path], id_style="relative")
    assert [ref.image_id for ref in relative] == ["a/deep/astronaut", "a/deep/chelsea", "b/coffee"]
    assert refs[0].read() == tmp_path / "a" / "deep" / "astronaut.jpg"


def test_duplicate_ids_are_refused_naming_both_files(tmp_path):
    write_photos(tmp_path / "train", ["coffee"])
    write_photos(tmp_path / "val", ["coffee"])
    with pytest.raises(ImageSourceError, match=r"duplicate image_id 'coffee'.*train.*val"):
        list_images("folder", [tmp_path])
    assert len(list_images("folder", [tmp_path], id_style="relative")) == 2


def test_list_source_reads_paths_ids_relative_paths_and_names_bad_lines(tmp_path):
    write_photos(tmp_path / "images", ["coffee", "rocket"])
    listing = tmp_path / "list.txt"
    listing.write_text(f"# comment\nimages/coffee.jpg\n\n{tmp_path / 'images' / 'rocket.jpg'}\tmy-rocket\n")
    refs = list_images("list", [listing])
    assert [ref.image_id for ref in refs] == ["coffee", "my-rocket"]
    assert refs[0].read() == tmp_path / "images" / "coffee.jpg"
    listing.write_text("a.jpg\tx\ty\n")
    with pytest.raises(ImageSourceError, match=r"list.txt:1: found 3 tab-separated columns"):
        list_images("list", [listing])


def test_hf_source_reads_an_image_column_with_ids(tmp_path):
    import datasets

    folder = write_photos(tmp_path / "images", ["coffee", "rocket"])
    dataset = datasets.Dataset.from_dict(
        {"image": [str(folder / "coffee.jpg"), str(folder / "rocket.jpg")], "name": ["c1", "r1"]}
    ).cast_column("image", datasets.Image())
    dataset.save_to_disk(str(tmp_path / "saved"))
    refs = list_images("hf", [tmp_path / "saved"], id_column="name")
    assert [ref.image_id for ref in refs] == ["c1", "r1"]
    assert refs[1].read() == (folder / "rocket.jpg").read_bytes()
    assert [ref.image_id for ref in list_images("hf", [tmp_path / "saved"])] == ["0", "1"]
    with pytest.raises(ImageSourceError, match=r"column 'name' is .*expected a datasets.Image column"):
        list_images("hf", [tmp_path / "saved"], image_column="name")


def write_img2dataset_shard(path, samples: list[tuple[str, bytes, str]]):
    """A shard as img2dataset writes it, through webdataset's TarWriter: {key}.jpg, {key}.txt, {key}.json."""
    import webdataset

    with webdataset.TarWriter(str(path)) as sink:
        for key, payload, caption in samples:
            sink.write(
                {
                    "__key__": key,
                    "jpg": payload,
                    "txt": caption,
                    "json": json.dumps({"key": key, "caption": caption, "status": "success"}),
                }
            )
    return path


def test_webdataset_source_reads_img2dataset_shards_in_order(tmp_path):
    from feature_fixtures import encode

    payloads = {
        name: encode(Image.fromarray(photo(name)).resize((64, 48)), "JPEG") for name in ("coffee", "rocket")
    }
    write_img2dataset_shard(tmp_path / "00000.tar", [("000000000", payloads["coffee"], "a cup")])
    write_img2dataset_shard(tmp_path / "00001.tar", [("000010000", payloads["rocket"], "a rocket")])
    refs = list_images("webdataset", [tmp_path / "00000.tar", tmp_path / "00001.tar"])
    assert [ref.image_id for ref in refs] == ["000000000", "000010000"]
    assert [ref.read() for ref in refs] == [payloads["coffee"], payloads["rocket"]]
    with tarfile.open(tmp_path / "00000.tar") as archive:
        assert sorted(archive.getnames()) == ["000000000.jpg", "000000000.json", "000000000.txt"]
    (tmp_path / "broken.tar").write_bytes(b"not a tar at all" * 100)
    with pytest.raises(ImageSourceError, match=r"broken.tar: not an uncompressed tar"):
        list_images("webdataset", [tmp_path / "broken.tar"])
