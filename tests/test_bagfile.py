"""The bag file: ours, and the feature files of CLAM (.h5 and .pt), TRIDENT and STAMP, as those tools write them."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch

from pathmil.errors import PathmilError
from pathmil.features.bagfile import read_bag, read_bag_attrs, write_bag

RNG = np.random.default_rng(0)
COORDS = np.array([[0, 0], [512, 0], [1024, 512], [1536, 2048]], np.int64)


def test_pathmil_layout_round_trips(tmp_path):
    features = RNG.standard_normal((4, 16)).astype(np.float16)
    coords_attrs = {"patch_size": 256, "patch_level": 0, "patch_size_level0": 512, "target_mpp": 0.5}
    attrs = {"slide_id": "s1", "encoder": "uni", "random_init": False, "failed_tile_coords": np.zeros((0, 2))}
    write_bag(
        tmp_path / "s1.h5", features, COORDS, coords_attrs, attrs, extra={"tissue_fraction": np.ones(4)}
    )
    bag = read_bag(tmp_path / "s1.h5")
    assert bag.layout == "pathmil" and bag.coords_unit == "px"
    assert bag.features.dtype == np.float16 and bag.n_instances == 4 and bag.dim == 16
    np.testing.assert_array_equal(bag.features, features)
    np.testing.assert_array_equal(bag.coords, COORDS)
    assert bag.coords_attrs == coords_attrs
    assert bag.attrs["slide_id"] == "s1" and bag.attrs["encoder"] == "uni" and bag.attrs["pathmil_version"]
    assert read_bag_attrs(tmp_path / "s1.h5")["random_init"] is False
    with h5py.File(tmp_path / "s1.h5") as f:
        assert f["tissue_fraction"].shape == (4,)
    assert not list(tmp_path.glob(".*tmp*"))  # written atomically, nothing left behind
    with pytest.raises(ValueError, match="do not match"):
        write_bag(tmp_path / "bad.h5", features[:3], COORDS, coords_attrs, attrs)


def test_clam_h5_layout(tmp_path):
    """CLAM's extract_features_fp.py: h5_files/<slide>.h5 with features and coords, no attributes."""
    with h5py.File(tmp_path / "clam.h5", "w") as f:
        f["features"] = RNG.standard_normal((4, 1024)).astype(np.float32)
        f["coords"] = COORDS
    bag = read_bag(tmp_path / "clam.h5")
    assert bag.layout == "clam" and bag.dim == 1024 and bag.coords_attrs == {} and bag.coords_unit == "px"
    np.testing.assert_array_equal(bag.coords, COORDS)


def test_clam_pt_layout(tmp_path):
    """CLAM's pt_files/<slide>.pt: the N x D tensor alone, no coordinates."""
    features = torch.randn(5, 1024)
    torch.save(features, tmp_path / "clam.pt")
    bag = read_bag(tmp_path / "clam.pt")
    assert bag.layout == "clam_pt" and bag.coords is None and bag.n_instances == 5
    np.testing.assert_array_equal(bag.features, features.numpy())
    torch.save({"features": features}, tmp_path / "dict.pt")
    with pytest.raises(PathmilError, match="expected a tensor"):
        read_bag(tmp_path / "dict.pt")


def test_trident_layout(tmp_path):
    """TRIDENT: features and coords, the patching geometry in the coords attributes."""
    geometry = {
        "patch_size": 256,
        "patch_size_level0": 512,
        "level0_magnification": 40,
        "target_magnification": 20,
        "level0_width": 4096,
        "level0_height": 3072,
        "overlap": 0,
        "name": "slideA",
    }
    with h5py.File(tmp_path / "trident.h5", "w") as f:
        f["features"] = RNG.standard_normal((4, 1536)).astype(np.float32)
        f.create_dataset("coords", data=COORDS)
        f["coords"].attrs.update(geometry)
    bag = read_bag(tmp_path / "trident.h5")
    assert bag.layout == "trident" and bag.dim == 1536
    assert bag.coords_attrs["patch_size_level0"] == 512 and bag.coords_attrs["name"] == "slideA"


def test_stamp_layout_with_micrometre_coordinates(tmp_path):
    """STAMP 2: feats (float16) and coords in micrometres, described by root attributes."""
    coords_um = COORDS * 0.25
    with h5py.File(tmp_path / "stamp.h5", "w") as f:
        f["coords"] = coords_um
        f["feats"] = RNG.standard_normal((4, 2560)).astype(np.float16)
        f.attrs.update({"extractor": "virchow2", "unit": "um", "tile_size_um": 256.0, "tile_size_px": 224})
    bag = read_bag(tmp_path / "stamp.h5")
    assert bag.layout == "stamp" and bag.coords_unit == "um" and bag.dim == 2560
    np.testing.assert_allclose(bag.coords, coords_um)
    assert bag.attrs["tile_size_um"] == 256.0 and bag.attrs["extractor"] == "virchow2"


def test_batch_axis_is_dropped_and_bad_files_are_clear_errors(tmp_path):
    with h5py.File(tmp_path / "batched.h5", "w") as f:  # some tools save 1 x N x D and 1 x N x 2
        f["features"] = RNG.standard_normal((1, 4, 8)).astype(np.float32)
        f["coords"] = COORDS[None]
    bag = read_bag(tmp_path / "batched.h5")
    assert bag.features.shape == (4, 8) and bag.coords.shape == (4, 2)

    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["embeddings"] = np.zeros((4, 8))
    with pytest.raises(PathmilError, match=r"neither 'features'.*nor 'feats'"):
        read_bag(tmp_path / "other.h5")
    (tmp_path / "text.h5").write_text("not hdf5")
    with pytest.raises(PathmilError, match="is not an HDF5 file"):
        read_bag(tmp_path / "text.h5")
    with pytest.raises(PathmilError, match="does not exist"):
        read_bag(tmp_path / "missing.h5")
    with h5py.File(tmp_path / "flat.h5", "w") as f:
        f["features"] = np.zeros(8)
    with pytest.raises(PathmilError, match="expected N x D"):
        read_bag(tmp_path / "flat.h5")
