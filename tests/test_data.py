import pytest
from PIL import Image

from vitcompress.data import LoadStats, Preprocessing, iter_batches, sample, scan_images
from vitcompress.errors import VitcompressError

PREP = Preprocessing(input_size=(3, 32, 32), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), resize_mode="exact")


def test_imagefolder_has_labels_and_classes(small_image_dir):
    s = scan_images(small_image_dir, require_labels=True)
    assert s.class_names == ("cat", "dog")
    assert list(s.labels) == [0, 0, 0, 1, 1, 1]


def test_flat_folder_needs_no_labels_but_eval_does(tmp_path):
    Image.new("RGB", (40, 30), "red").save(tmp_path / "a.png")
    s = scan_images(tmp_path)
    assert s.labels is None and len(s) == 1
    with pytest.raises(VitcompressError, match="ImageFolder"):
        scan_images(tmp_path, require_labels=True)


def test_grayscale_rgba_converted_and_corrupt_skipped(tmp_path):
    Image.new("L", (50, 20), 128).save(tmp_path / "gray.png")
    Image.new("RGBA", (32, 32), (1, 2, 3, 4)).save(tmp_path / "rgba.png")
    (tmp_path / "broken.jpg").write_bytes(b"not an image at all")
    stats = LoadStats()
    batches = list(iter_batches(scan_images(tmp_path), PREP, 8, stats))
    assert batches[0][0].shape == (2, 3, 32, 32)
    assert stats.loaded == 2 and stats.skipped == 1


def test_all_corrupt_or_empty_is_an_error(tmp_path):
    with pytest.raises(VitcompressError, match="no images"):
        scan_images(tmp_path)
    (tmp_path / "x.jpg").write_bytes(b"garbage")
    with pytest.raises(VitcompressError, match="could be read"):
        list(iter_batches(scan_images(tmp_path), PREP))


def test_sampling_is_seeded(small_image_dir):
    s = scan_images(small_image_dir)
    assert sample(s, 3, 1).paths == sample(s, 3, 1).paths
    assert sample(s, 3, 1).paths != sample(s, 3, 2).paths or sample(s, 3, 1).paths != sample(s, 3, 3).paths


def test_crop_mode_resizes_large_images():
    prep = Preprocessing(input_size=(3, 224, 224), mean=(0, 0, 0), std=(1, 1, 1), crop_pct=0.875)
    x = prep(Image.new("RGB", (500, 375), "blue"))
    assert x.shape == (3, 224, 224)
