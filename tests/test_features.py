"""Stage 2: the encoder registry, the extraction loop, resume, damaged tiles and the command line."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
import torch

from pathmil.cli import main
from pathmil.errors import PathmilError, SlideError
from pathmil.features.bagfile import read_bag
from pathmil.features.encoders import (
    DINOV2_ATTENTION_NAMES,
    create_encoder,
    dinov2_hf_to_timm,
    encoder_spec,
    file_sha256,
    list_encoders,
    resolve_weights,
)
from pathmil.features.extract import (
    ExtractConfig,
    FeatureExtractor,
    _padded_call,
    default_workers,
    extract_cohort,
    extract_slide,
    readers_needed,
    resolve_precision,
)
from pathmil.slide.reader import Slide
from pathmil.slide.tile import TileConfig, compute_tiles, tile_slide
from pathmil.slide.tilefile import TileSet, read_tiles, write_tiles
from pathmil.slide.tiling import grid_positions

# Output dimensions stated by each model card (the embedding rule included: Virchow2 is class + mean token).
MODEL_CARD_DIMS = {
    "resnet50_trunc": 1024,
    "mobilenet_v2": 1280,
    "uni": 1024,
    "uni2_h": 1536,
    "virchow2": 2560,
    "h_optimus_0": 1536,
    "h_optimus_1": 1536,
    "prov_gigapath": 1536,
    "phikon_v2": 1024,
    "conch_v1_5": 768,
}
# Parameter counts from the model cards and papers, in millions (timm's count of the same architecture).
MODEL_CARD_PARAMS_M = {"uni": 303, "uni2_h": 681, "virchow2": 631, "h_optimus_0": 1134, "prov_gigapath": 1134}


def mobilenet_config(weights: Path | None, **changes) -> ExtractConfig:
    """MobileNetV2 (real weights when given, else random) with one reader process: the real loop, quickly.

    Tests other than the ``mobilenet`` fixture skip the TorchScript fusion (``optimize="none"``): building
    it takes seconds, and the fixture covers it.
    """
    config = ExtractConfig(
        encoder="mobilenet_v2", weights=str(weights) if weights else None, workers=1, optimize="none"
    )
    return config.replace(random_init=weights is None, **changes)


# ------------------------------------------------------------------------------------------ registry


def test_registry_lists_every_model_card_entry():
    assert set(MODEL_CARD_DIMS) <= set(list_encoders())
    with pytest.raises(PathmilError, match="unknown encoder 'uni3'"):
        encoder_spec("uni3")
    with pytest.raises(PathmilError, match="timm has no model"):
        encoder_spec("timm:not_a_model")


@pytest.mark.parametrize("name", [*sorted(MODEL_CARD_DIMS), "timm:resnet18", "timm:vit_small_patch16_224"])
def test_every_entry_builds_and_embeds_to_its_dimension(name):
    """Built on the meta device (no memory: the giant ViTs are 4.5 GB in fp32), run on a meta batch of the
    model's input size: the real module code computes the embedding shape, including Virchow2's rule."""
    encoder = create_encoder(name, random_init=True, device="meta")
    side = encoder.preprocess.input_px
    with torch.inference_mode():
        out = encoder.model(torch.empty(2, 3, side, side, device="meta"))
    assert tuple(out.shape) == (2, encoder.dim)
    if name in MODEL_CARD_DIMS:
        assert encoder.dim == MODEL_CARD_DIMS[name]
    if name in MODEL_CARD_PARAMS_M:
        params = sum(p.numel() for p in encoder.model.parameters()) / 1e6
        assert params == pytest.approx(MODEL_CARD_PARAMS_M[name], rel=0.01)
    assert encoder.random_init and encoder.weights_sha256 == ""
    assert not any(p.requires_grad for p in encoder.model.parameters()) and not encoder.model.training


@pytest.mark.parametrize("name", ["resnet50_trunc", "mobilenet_v2", "timm:vit_tiny_patch16_224"])
def test_random_init_runs_for_real_and_is_reproducible(name):
    """A real forward for the small entries (the foundation models are 0.3-1.1 B parameters: meta only)."""
    first = create_encoder(name, random_init=True)
    side = first.preprocess.input_px
    x = torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        a = first.model(x)
        b = create_encoder(name, random_init=True).model(x)
    assert a.shape == (2, first.dim) and torch.isfinite(a).all()
    assert torch.equal(a, b)


def test_virchow2_embedding_skips_the_register_tokens():
    import timm

    from pathmil.features.encoders import ClassAndMeanPatchTokens

    vit = timm.create_model(
        "vit_small_patch16_224", img_size=32, reg_tokens=4, global_pool="", num_classes=0
    ).eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        tokens = vit(x)  # class, 4 registers, 4 patches
        assert tokens.shape == (2, 9, 384)
        expected = torch.cat([tokens[:, 0], tokens[:, 5:].mean(1)], dim=-1)
        torch.testing.assert_close(ClassAndMeanPatchTokens(vit)(x), expected)


def test_conch_attentional_pooler_matches_coca_attention():
    """One learned query attends over the normed tokens (8 heads, bias-free projections), as in CoCa/CONCH."""
    from pathmil.features.encoders import AttentionalPooler

    pool = AttentionalPooler(dim=32, context_dim=48, heads=4, queries=1).eval()
    tokens = torch.randn(3, 7, 48, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        q = pool.to_q(pool.ln_q(pool.query))  # 1 x 32
        k, v = pool.to_kv(pool.ln_k(tokens)).chunk(2, dim=-1)  # 3 x 7 x 32 each
        heads = []
        for h in range(4):
            part = slice(8 * h, 8 * h + 8)
            weights = torch.softmax(q[:, part] @ k[..., part].transpose(1, 2) / 8**0.5, dim=-1)
            heads.append(weights @ v[..., part])
        expected = pool.to_out(torch.cat(heads, dim=-1))
        torch.testing.assert_close(pool(tokens), expected)


def test_special_preprocessing_follows_the_model_cards():
    assert encoder_spec("prov_gigapath").preprocess.resize_px == 256  # resize 256, centre crop 224
    assert encoder_spec("prov_gigapath").preprocess.input_px == 224
    assert encoder_spec("h_optimus_0").preprocess.mean == (0.707223, 0.578729, 0.703617)
    assert encoder_spec("h_optimus_1").preprocess.std == (0.211883, 0.230117, 0.177517)
    assert encoder_spec("conch_v1_5").preprocess.input_px == 448
    assert encoder_spec("timm:resnet18").preprocess.resize_px == 235  # timm: 224 / crop_pct 0.95


# ------------------------------------------------------------------------------------------- weights


def test_missing_weights_name_file_and_repository(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(PathmilError, match=r"pytorch_model\.bin.*MahmoodLab/UNI2-h.*--weights"):
        create_encoder("uni2_h")
    with pytest.raises(PathmilError, match="does not exist"):
        create_encoder("uni", weights=tmp_path / "nowhere.bin")
    with pytest.raises(PathmilError, match="not both"):
        create_encoder("uni", weights=tmp_path / "x.bin", random_init=True)


def test_weights_from_the_torch_hub_and_hugging_face_caches(tmp_path, monkeypatch, mobilenet_weights):
    import huggingface_hub.constants
    import torchvision

    checkpoints = tmp_path / "torch" / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    shutil.copy(mobilenet_weights, checkpoints)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    encoder = create_encoder("mobilenet_v2")
    assert encoder.weights_sha256 == file_sha256(mobilenet_weights) and not encoder.random_init
    reference = torchvision.models.mobilenet_v2()
    reference.load_state_dict(torch.load(mobilenet_weights, weights_only=True))
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        expected = reference.eval().features(x).mean(dim=(2, 3))
        torch.testing.assert_close(encoder.model(x), expected)

    # a Hugging Face cache snapshot (the layout huggingface_hub writes), in safetensors
    from safetensors.torch import save_file

    snapshot = tmp_path / "hf" / "models--timm--resnet50.tv_in1k" / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (tmp_path / "hf" / "models--timm--resnet50.tv_in1k" / "refs").mkdir()
    (tmp_path / "hf" / "models--timm--resnet50.tv_in1k" / "refs" / "main").write_text("0123abcd")
    resnet = torchvision.models.resnet50()
    save_file(resnet.state_dict(), snapshot / "model.safetensors")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    found = resolve_weights("resnet50_trunc", encoder_spec("resnet50_trunc"), None)
    assert found == snapshot / "model.safetensors"
    trunc = create_encoder("resnet50_trunc")
    torch.testing.assert_close(trunc.model.layer3[0].conv1.weight, resnet.layer3[0].conv1.weight)

    with pytest.raises(PathmilError, match="cannot be loaded into encoder resnet50_trunc"):
        create_encoder("resnet50_trunc", weights=mobilenet_weights)


def _dinov2_reference(state: dict[str, torch.Tensor], x: torch.Tensor, heads: int) -> torch.Tensor:
    """Hugging Face Dinov2Model's forward written out from its own parameter names: class token output."""
    import torch.nn.functional as F

    def norm(h, name):
        return F.layer_norm(h, h.shape[-1:], state[f"{name}.weight"], state[f"{name}.bias"], eps=1e-6)

    def linear(h, name):
        return F.linear(h, state[f"{name}.weight"], state[f"{name}.bias"])

    patches = F.conv2d(
        x,
        state["embeddings.patch_embeddings.projection.weight"],
        state["embeddings.patch_embeddings.projection.bias"],
        stride=16,
    )
    h = torch.cat(
        [state["embeddings.cls_token"].expand(len(x), -1, -1), patches.flatten(2).transpose(1, 2)], 1
    )
    h = h + state["embeddings.position_embeddings"]
    layers = sorted({int(k.split(".")[2]) for k in state if k.startswith("encoder.layer.")})
    for i in layers:
        p = f"encoder.layer.{i}."
        y = norm(h, p + "norm1")
        q, k, v = (linear(y, p + f"attention.attention.{n}") for n in ("query", "key", "value"))
        q, k, v = (t.unflatten(-1, (heads, -1)).transpose(1, 2) for t in (q, k, v))
        attn = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1) @ v
        y = linear(attn.transpose(1, 2).flatten(2), p + "attention.output.dense")
        h = h + state[p + "layer_scale1.lambda1"] * y
        y = linear(F.gelu(linear(norm(h, p + "norm2"), p + "mlp.fc1")), p + "mlp.fc2")
        h = h + state[p + "layer_scale2.lambda1"] * y
    return norm(h, "layernorm")[:, 0]


def test_phikon_v2_transformers_names_map_onto_timm():
    """A synthetic state dict in transformers' Dinov2Model naming (as Phikon-v2 ships; transformers 5's
    names too), small enough to run: mapped onto timm's module it computes what the Dinov2 forward computes
    from the original names. (Also checked bit-exact against transformers 5.24's Dinov2Model, which is not a
    dependency.)"""
    import timm

    dim, depth, heads = 64, 2, 4
    gen = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=gen) * 0.1

    state = {
        "embeddings.cls_token": rand(1, 1, dim),
        "embeddings.mask_token": rand(1, dim),
        "embeddings.position_embeddings": rand(1, 1 + 4, dim),
        "embeddings.patch_embeddings.projection.weight": rand(dim, 3, 16, 16),
        "embeddings.patch_embeddings.projection.bias": rand(dim),
        "layernorm.weight": 1 + rand(dim),
        "layernorm.bias": rand(dim),
    }
    for i in range(depth):
        p = f"encoder.layer.{i}."
        for name, shape in [
            ("norm1", (dim,)),
            ("norm2", (dim,)),
            ("attention.attention.query", (dim, dim)),
            ("attention.attention.key", (dim, dim)),
            ("attention.attention.value", (dim, dim)),
            ("attention.output.dense", (dim, dim)),
            ("mlp.fc1", (4 * dim, dim)),
            ("mlp.fc2", (dim, 4 * dim)),
        ]:
            state[p + name + ".weight"] = (1 + rand(*shape)) if name.startswith("norm") else rand(*shape)
            state[p + name + ".bias"] = rand(shape[0])
        state[p + "layer_scale1.lambda1"] = 1 + rand(dim)
        state[p + "layer_scale2.lambda1"] = 1 + rand(dim)
    vit = timm.create_model(
        "vit_large_patch14_dinov2",
        img_size=32,
        patch_size=16,
        embed_dim=dim,
        depth=depth,
        num_heads=heads,
        num_classes=0,
    ).eval()
    x = torch.randn(3, 3, 32, 32, generator=gen)
    expected = _dinov2_reference(state, x, heads)
    renamed = dict(zip(DINOV2_ATTENTION_NAMES["v4"], DINOV2_ATTENTION_NAMES["v5"]))
    saved_by_v5 = {}  # the same weights as transformers 5 names them
    for key, value in state.items():
        for old, new in renamed.items():
            key = key.replace(f".{old}.", f".{new}.")
        saved_by_v5[key] = value
    assert "encoder.layer.1.attention.o_proj.bias" in saved_by_v5
    for weights in (state, saved_by_v5):
        vit.load_state_dict(dinov2_hf_to_timm(weights, vit), strict=True)
        with torch.inference_mode():
            torch.testing.assert_close(vit(x), expected, rtol=1e-4, atol=1e-5)
    # a checkpoint saved on a finer grid is resampled to the model's grid once
    state["embeddings.position_embeddings"] = rand(1, 1 + 16, dim)
    assert dinov2_hf_to_timm(state, vit)["pos_embed"].shape == (1, 1 + 4, dim)


# ----------------------------------------------------------------------------------------- precision


def test_precision_auto_follows_the_hardware_and_the_encoder(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported", "_is_amx_fp16_supported"):
        monkeypatch.setattr(torch.cpu, probe, lambda: False)
    assert resolve_precision("auto", cpu) == "fp32"  # AVX2 only: bf16 is emulated and slow
    assert resolve_precision("auto", cpu, half="fp16") == "fp32"
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert resolve_precision("auto", cpu) == "bf16"
    assert resolve_precision("auto", cpu, half="fp16") == "fp32"  # no AMX-FP16
    assert resolve_precision("fp16", cpu) == "fp16"  # an explicit choice is kept
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_precision("auto", cuda) == "bf16"
    assert resolve_precision("auto", cuda, half="fp16") == "fp16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_precision("auto", cuda) == "fp16"
    assert encoder_spec("mobilenet_v2").half == "fp16" and encoder_spec("resnet50_trunc").half == "bf16"


def test_mobilenet_half_precision_is_faithful_on_real_tiles(cmu_tiles, mobilenet_weights):
    """The 16-bit type MobileNetV2 gets by default keeps every tile's features at cosine >= 0.999 to fp32
    (bf16 does not: 0.988 at worst, benchmarks/RESULTS.md). Emulated on this CPU, hence only 4 tiles."""
    from pathmil.features.extract import EncoderRunner, TileBatches

    slide, tiles_path = cmu_tiles
    encoder = create_encoder("mobilenet_v2", weights=mobilenet_weights)
    tiles = read_tiles(tiles_path)
    images, _, _ = TileBatches(slide, "cmu", None, tiles, encoder.preprocess)[[10, 20, 30, 40]]
    fp32 = EncoderRunner(encoder, torch.device("cpu"), "fp32")(images)
    half = EncoderRunner(encoder, torch.device("cpu"), encoder.half)(images)
    assert torch.nn.functional.cosine_similarity(half.double(), fp32.double()).min() >= 0.999


# ------------------------------------------------------------------------------------------ real H&E


@pytest.fixture(scope="module")
def cmu_tiles(slides_dir, tmp_path_factory) -> tuple[Path, Path]:
    """The real H&E region tiled with a low tissue threshold, so faint edges are kept too."""
    out = tmp_path_factory.mktemp("cmu") / "cmu.h5"
    slide = slides_dir / "cmu_small_region.svs"
    tile_slide(slide, out, TileConfig(preset="bwh_biopsy", min_tissue=0.0))
    return slide, out


@pytest.fixture(scope="module")
def mobilenet(mobilenet_weights) -> FeatureExtractor:
    """The real ImageNet MobileNetV2 with the default settings (on this CPU: fp32, TorchScript fusion)."""
    return FeatureExtractor(mobilenet_config(mobilenet_weights, optimize="auto"))


def test_bag_shapes_dtypes_and_provenance(cmu_tiles, mobilenet, mobilenet_weights, tmp_path):
    slide, tiles_path = cmu_tiles
    facts = extract_slide(slide, tiles_path, tmp_path / "bag.h5", mobilenet)
    tiles = read_tiles(tiles_path)
    bag = read_bag(tmp_path / "bag.h5")
    assert bag.layout == "pathmil" and bag.features.dtype == np.float16
    assert bag.features.shape == (len(tiles.coords), 1280)
    np.testing.assert_array_equal(bag.coords, tiles.coords)
    for key in ("patch_size", "patch_level", "patch_size_level0", "level0_width", "target_mpp", "tile_px"):
        assert bag.coords_attrs[key] == tiles.coords_attrs[key]
    attrs = bag.attrs
    assert attrs["encoder"] == "mobilenet_v2" and not attrs["random_init"]
    assert attrs["encoder_weights_sha256"] == file_sha256(mobilenet_weights)
    assert attrs["slide_id"] == "cmu_small_region" and attrs["slide_mpp"] == pytest.approx(0.499)
    assert attrs["slide_mpp_x"] == attrs["slide_mpp_y"] == pytest.approx(0.499)
    assert attrs["slide_quickhash"] == tiles.attrs["slide_quickhash"] and len(attrs["slide_quickhash"]) == 64
    assert list(attrs["level0_size"]) == [2220, 2967]
    assert attrs["tile_px"] == 256 and attrs["target_mpp"] == 0.5 and attrs["n_failed_tiles"] == 0
    assert attrs["precision"] == facts["precision"] and attrs["tiles_sha256"]
    assert np.isfinite(bag.features).all()
    written = json.loads((tmp_path / "bag.json").read_text())
    assert written["status"] == "ok" and written["n_tiles"] == len(tiles.coords) and written["n_failed"] == 0
    assert written["tiles_per_second"] > 0 and written["device"] == "cpu"

    float32 = FeatureExtractor(mobilenet_config(mobilenet_weights, dtype="float32", workers=0))
    extract_slide(slide, tiles_path, tmp_path / "bag32.h5", float32)
    bag32 = read_bag(tmp_path / "bag32.h5")
    assert bag32.features.dtype == np.float32
    np.testing.assert_allclose(bag32.features, bag.features.astype(np.float32), rtol=2e-3, atol=2e-3)


def test_batch_size_does_not_change_features(cmu_tiles, mobilenet, tmp_path):
    slide, tiles_path = cmu_tiles
    tiles = read_tiles(tiles_path)
    subset = TileSet(tiles.coords[:24], tiles.coords_attrs, tiles.attrs, tiles.tissue_fraction[:24])
    write_tiles(tmp_path / "subset.h5", subset)
    bags = {}
    default = mobilenet.config
    try:
        for batch_size in (1, 64):
            mobilenet.config = default.replace(batch_size=batch_size, dtype="float32")
            extract_slide(slide, tmp_path / "subset.h5", tmp_path / f"b{batch_size}.h5", mobilenet)
            bags[batch_size] = read_bag(tmp_path / f"b{batch_size}.h5").features
    finally:
        mobilenet.config = default
    np.testing.assert_allclose(bags[1], bags[64], rtol=1e-4, atol=1e-4)


def test_no_more_readers_than_batches_and_their_first_round_is_timed(cmu_tiles, mobilenet, tmp_path):
    """A slide of 24 tiles at batch 16 is 2 batches: 2 readers start, not the 4 asked for."""
    slide, tiles_path = cmu_tiles
    tiles = read_tiles(tiles_path)
    subset = TileSet(tiles.coords[:24], tiles.coords_attrs, tiles.attrs, tiles.tissue_fraction[:24])
    write_tiles(tmp_path / "subset.h5", subset)
    default = mobilenet.config
    try:
        mobilenet.config = default.replace(batch_size=16, workers=4)
        facts = extract_slide(slide, tmp_path / "subset.h5", tmp_path / "bag.h5", mobilenet)
    finally:
        mobilenet.config = default
    assert facts["workers"] == 2 and facts["n_tiles"] == 24
    seconds = facts["seconds"]
    # both batches are the first round: it ends with the last batch read
    assert 0 < seconds["first_round"] <= seconds["total"]
    assert seconds["wait_for_tiles"] + seconds["encode"] <= seconds["total"]
    assert readers_needed(24, 16) == 2 and readers_needed(32, 16) == 2 and readers_needed(1, 64) == 1


def test_default_readers_every_thread_but_one_at_most_8_on_a_cpu_and_16_on_a_gpu(monkeypatch):
    """On a GPU the readers set the pace (H200: 15 readers 36-43 % faster than 8, benchmarks/RESULTS.md)."""
    for threads, cpu, cuda in [(32, 8, 16), (16, 8, 15), (4, 3, 3), (1, 1, 1)]:
        monkeypatch.setattr(torch, "get_num_threads", lambda threads=threads: threads)
        assert default_workers(torch.device("cpu")) == cpu
        assert default_workers(torch.device("cuda")) == cuda


@pytest.mark.parametrize(
    "device, optimize, padded", [("cuda", "none", True), ("cpu", "compile", True), ("cpu", "none", False)]
)
def test_the_last_short_batch_is_padded_where_a_new_shape_costs_more(device, optimize, padded):
    """On CUDA (a new input shape cost about a second per slide) and for compiled models (recompiled per
    shape) the encoder sees the batch's shape every time; the padding's features are dropped."""
    shapes = []

    class Runner:
        channels_last = False

        def __init__(self):
            self.device, self.optimize = torch.device(device), optimize

        def normalise(self, images):
            return images.permute(0, 3, 1, 2).float()

        def encode(self, x):
            shapes.append(tuple(x.shape))
            return x.flatten(1).sum(1, keepdim=True)

        def __call__(self, images):
            return self.encode(self.normalise(images))

    images = torch.arange(5 * 2 * 2 * 3, dtype=torch.uint8).reshape(5, 2, 2, 3)
    out = _padded_call(Runner(), images, batch_size=8)
    assert shapes == [(8 if padded else 5, 3, 2, 2)]
    np.testing.assert_array_equal(out.numpy(), images.flatten(1).float().sum(1, keepdim=True).numpy())


def test_padded_features_equal_unpadded_ones_on_a_real_encoder(mobilenet):
    """The padded path (normalise, pad on the device in channels_last, encode, drop) gives each tile's
    features as the plain call does."""
    runner = mobilenet.runner
    side = runner.encoder.preprocess.input_px
    images = torch.randint(
        0, 256, (3, side, side, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    plain = runner(images)
    optimize = runner.optimize
    try:
        runner.optimize = "compile"  # takes the padded path without compiling
        padded = _padded_call(runner, images, batch_size=8)
    finally:
        runner.optimize = optimize
    assert padded.shape == plain.shape == (3, runner.encoder.dim)
    np.testing.assert_allclose(padded.numpy(), plain.numpy(), rtol=1e-4, atol=1e-4)


def test_real_weights_separate_tissue_from_glass(slides_dir, mobilenet, tmp_path):
    """Every grid position of the real H&E region, tissue and empty glass alike: with ImageNet weights the
    two kinds of tile fall apart in feature space (leave-one-out nearest centroid)."""
    slide_path = slides_dir / "cmu_small_region.svs"
    with Slide(slide_path) as slide:
        result = compute_tiles(slide, TileConfig(preset="bwh_biopsy", min_tissue=0.0))
        size_x, size_y = result.facts["tile_size_level0"]
        xs = grid_positions(slide.dimensions[0], size_x, size_x)
        ys = grid_positions(slide.dimensions[1], size_y, size_y)
    fraction = {tuple(c): f for c, f in zip(result.tiles.coords.tolist(), result.tiles.tissue_fraction)}
    coords = np.array([(x, y) for y in ys for x in xs], np.int64)
    tissue = np.array([fraction.get((x, y), 0.0) for x, y in coords.tolist()])
    keep = (tissue >= 0.95) | (tissue == 0)
    tiles = dataclasses.replace(
        result.tiles, coords=coords[keep], tissue_fraction=tissue[keep].astype(np.float32)
    )
    write_tiles(tmp_path / "grid.h5", tiles)
    extract_slide(slide_path, tmp_path / "grid.h5", tmp_path / "grid_bag.h5", mobilenet)
    features = read_bag(tmp_path / "grid_bag.h5").features.astype(np.float64)
    is_tissue = tissue[keep] >= 0.95
    assert is_tissue.sum() >= 20 and (~is_tissue).sum() >= 20
    assert features.std(axis=0).mean() > 0.05 and np.linalg.matrix_rank(features) > 20  # not degenerate
    correct = 0
    for i in range(len(features)):
        others = np.arange(len(features)) != i
        centroids = [features[others & (is_tissue == c)].mean(0) for c in (False, True)]
        nearest = int(np.linalg.norm(features[i] - centroids[1]) < np.linalg.norm(features[i] - centroids[0]))
        correct += nearest == is_tissue[i]
    assert correct / len(features) >= 0.95


def test_resume_skips_current_bags_and_redoes_changed_ones(cmu_tiles, mobilenet, mobilenet_weights, tmp_path):
    slide, tiles_path = cmu_tiles
    tiles = read_tiles(tiles_path)
    write_tiles(
        tmp_path / "some.h5", dataclasses.replace(tiles, coords=tiles.coords[:12], tissue_fraction=None)
    )
    out = tmp_path / "bag.h5"
    assert not extract_slide(slide, tmp_path / "some.h5", out, mobilenet)["skipped"]
    stamp = out.stat().st_mtime_ns
    again = extract_slide(slide, tmp_path / "some.h5", out, mobilenet)
    assert again["skipped"] and again["n_tiles"] == 12 and out.stat().st_mtime_ns == stamp

    # other tiles: redo
    write_tiles(
        tmp_path / "fewer.h5", dataclasses.replace(tiles, coords=tiles.coords[:5], tissue_fraction=None)
    )
    assert not extract_slide(slide, tmp_path / "fewer.h5", out, mobilenet)["skipped"]
    assert read_bag(out).n_instances == 5

    random = FeatureExtractor(mobilenet_config(None))  # other weights: redo
    assert not extract_slide(slide, tmp_path / "fewer.h5", out, random)["skipped"]
    assert read_bag(out).attrs["random_init"] and read_bag(out).attrs["encoder_weights_sha256"] == ""
    assert extract_slide(slide, tmp_path / "fewer.h5", out, random)["skipped"]

    forced = FeatureExtractor(mobilenet_config(None, overwrite=True))
    assert not extract_slide(slide, tmp_path / "fewer.h5", out, forced)["skipped"]


def test_a_rescan_of_the_same_size_under_the_same_id_is_extracted_again(tmp_path, mobilenet):
    """A slide file replaced by another of the same size (a re-scan), tiled again on the same grid: its
    tiles' coordinates match the old bag's, but the slide differs (OpenSlide's quickhash-1), so the old
    features must not be kept, here nor by `pathmil predict --package --slides`."""
    from pathmil.demo import write_pyramidal_tiff
    from pathmil.evaluation.deploy import tiles_are_current
    from pathmil.features.extract import tiles_sha256

    rng = np.random.default_rng(0)
    path, tiles, out = tmp_path / "case 01.tiff", tmp_path / "tiles.h5", tmp_path / "bag.h5"
    config = TileConfig(preset="bwh_biopsy", min_tissue=0.0)

    def scan(shade: int) -> None:  # pink tissue everywhere, so both scans get the same tile grid
        pink = np.array([200, shade, 180]) + rng.normal(0, 25, (512, 768, 3))
        write_pyramidal_tiff(path, np.clip(pink, 0, 255).astype(np.uint8), mpp=0.5)

    scan(120)
    tile_slide(path, tiles, config)
    first_grid = tiles_sha256(read_tiles(tiles))
    extract_slide(path, tiles, out, mobilenet)
    first = read_bag(out).features
    assert tiles_are_current(tiles, config, "case 01", path)
    assert extract_slide(path, tiles, out, mobilenet)["skipped"]

    scan(150)
    assert not tiles_are_current(tiles, config, "case 01", path)  # the tiles name the first scan
    tile_slide(path, tiles, config)
    assert tiles_sha256(read_tiles(tiles)) == first_grid  # the same coordinates: only the slide differs
    assert not extract_slide(path, tiles, out, mobilenet)["skipped"]
    assert not np.allclose(read_bag(out).features, first)
    assert extract_slide(path, tiles, out, mobilenet)["skipped"]  # now current


# ----------------------------------------------------------------------------------- damaged tiles


def test_tiles_with_damaged_jpeg_data_are_dropped_and_named(tmp_path, mobilenet):
    """A pyramidal JPEG TIFF whose compressed data is damaged in three level-0 tiles: exactly the tiles
    over them fail to decode; they are dropped, counted and named, and the rest of the slide is kept."""
    from pathmil.demo import write_pyramidal_tiff

    rng = np.random.default_rng(0)
    pink = np.array([200, 120, 180]) + rng.normal(0, 25, (1024, 1536, 3))
    path = tmp_path / "damaged.tiff"
    write_pyramidal_tiff(path, np.clip(pink, 0, 255).astype(np.uint8), mpp=0.5)
    damaged = [2, 9, 17]  # TIFF tile numbers, row-major, 6 per row
    with tifffile.TiffFile(path) as tif:
        offsets, counts = tif.pages[0].dataoffsets, tif.pages[0].databytecounts
    data = bytearray(path.read_bytes())
    for tile in damaged:
        middle = offsets[tile] + counts[tile] // 2
        data[middle : middle + 4] = b"\xff\xc4\x00\x01"  # a Huffman-table marker with an impossible length
    path.write_bytes(bytes(data))
    tile_slide(path, tmp_path / "tiles.h5", TileConfig(preset="bwh_biopsy", min_tissue=0.5))
    tiles = read_tiles(tmp_path / "tiles.h5")
    assert len(tiles.coords) == 24 and tiles.read_px == 256 and tiles.level == 0

    facts = extract_slide(path, tmp_path / "tiles.h5", tmp_path / "bag.h5", mobilenet)
    expected = sorted(((t % 6) * 256, (t // 6) * 256) for t in damaged)
    assert sorted(map(tuple, facts["failed_tile_coords"])) == expected
    assert (
        facts["n_failed"] == 3 and facts["n_tiles"] == 21 and "dropped 3 of 24 tiles" in facts["warnings"][0]
    )
    bag = read_bag(tmp_path / "bag.h5")
    assert bag.n_instances == 21 and bag.attrs["n_failed_tiles"] == 3
    assert sorted(map(tuple, bag.attrs["failed_tile_coords"].tolist())) == expected
    assert not set(map(tuple, bag.coords.tolist())) & set(expected)


def _unreadable_tiles(out: Path) -> None:
    """A tiles file for unreadable.svs (16 x 16 px; it opens, but every read fails)."""
    coords = np.array([(0, 0), (8, 0), (0, 8), (8, 8)], np.int64)
    attrs = {"patch_size": 8, "patch_level": 0, "tile_px": 8, "target_mpp": 0.499, "slide_mpp": 0.499}
    attrs |= {"level0_width": 16, "level0_height": 16}
    write_tiles(out, TileSet(coords, attrs, {"slide_id": "unreadable"}))


def test_a_slide_whose_every_tile_fails_is_one_clear_error(slides_dir, tmp_path, mobilenet):
    _unreadable_tiles(tmp_path / "tiles.h5")
    with pytest.raises(SlideError, match=r"none of its 4 tiles could be read .*Bogus marker length"):
        extract_slide(slides_dir / "unreadable.svs", tmp_path / "tiles.h5", tmp_path / "bag.h5", mobilenet)
    assert not (tmp_path / "bag.h5").exists() and not (tmp_path / "bag.json").exists()


def test_tiles_of_another_slide_are_refused(cmu_tiles, slides_dir, tmp_path, mobilenet):
    _, tiles_path = cmu_tiles
    with pytest.raises(SlideError, match="was made for a 2220x2967 slide"):
        extract_slide(slides_dir / "small.svs", tiles_path, tmp_path / "bag.h5", mobilenet)
    # the same size, another file: OpenSlide's fingerprint of the slide (recorded at tiling) differs
    tiles = read_tiles(tiles_path)
    other = dataclasses.replace(tiles, attrs={**tiles.attrs, "slide_quickhash": "0" * 64})
    write_tiles(tmp_path / "other.h5", other)
    with pytest.raises(
        SlideError, match=r"was made from another file than cmu_small_region\.svs \(its slide"
    ):
        extract_slide(
            slides_dir / "cmu_small_region.svs", tmp_path / "other.h5", tmp_path / "b.h5", mobilenet
        )
    assert not (tmp_path / "b.h5").exists()


# ------------------------------------------------------------------------------------- command line


def test_cli_one_slide_and_skip_errors(cmu_tiles, slides_dir, mobilenet_weights, tmp_path, capsys):
    slide, tiles_path = cmu_tiles
    common = ["--encoder", "mobilenet_v2", "--weights", str(mobilenet_weights), "--workers", "1"]
    common += ["--optimize", "none"]
    assert (
        main(["extract", str(slide), "--tiles", str(tiles_path), "--out", str(tmp_path / "a.h5"), *common])
        == 0
    )
    assert "1280 features" in capsys.readouterr().out
    facts = json.loads((tmp_path / "a.json").read_text())
    assert facts["status"] == "ok" and facts["precision"] == "fp32" and facts["dim"] == 1280

    # the tile stage failed for this slide: its facts JSON sits where the tiles file would be
    failed_tiles = tmp_path / "bad_tiles.h5"
    failure = {"slide_id": "x", "status": "failed", "stage": "tile", "error": "slide x: no tissue"}
    failed_tiles.with_suffix(".json").write_text(json.dumps(failure))
    argv = ["extract", str(slide), "--tiles", str(failed_tiles), "--out", str(tmp_path / "b.h5"), *common]
    assert main(argv) == 1
    assert "no tissue" in capsys.readouterr().err
    assert main([*argv, "--skip-errors"]) == 0
    recorded = json.loads((tmp_path / "b.json").read_text())
    assert recorded["status"] == "failed" and recorded["stage"] == "tile" and "no tissue" in recorded["error"]

    _unreadable_tiles(tmp_path / "u.h5")
    argv = ["extract", str(slides_dir / "unreadable.svs"), "--tiles", str(tmp_path / "u.h5")]
    assert main([*argv, "--out", str(tmp_path / "u_bag.h5"), *common, "--skip-errors"]) == 0
    recorded = json.loads((tmp_path / "u_bag.json").read_text())
    assert recorded["stage"] == "extract" and "none of its 4 tiles" in recorded["error"]
    with pytest.raises(SystemExit):
        main(["extract", str(slide), "--tiles", str(tiles_path), "--out", "x.h5", "--dtype", "int8"])


def test_batch_mode_loads_once_and_records_failures(demo_cohort, mobilenet_weights, tmp_path, monkeypatch):
    import pathmil.features.extract as extract_module

    table = pd.read_csv(demo_cohort / "cohort.csv").iloc[:3]
    table["path"] = [str(demo_cohort / p) for p in table["path"]]
    table.to_csv(tmp_path / "cohort.csv", index=False)
    for row in table.iloc[:2].itertuples():  # the third slide has no tiles file
        tiles = tmp_path / "tiles" / f"{row.slide_id}.h5"
        tile_slide(row.path, tiles, TileConfig(preset="bwh_biopsy"), mpp=row.mpp)
        some = read_tiles(tiles)  # a dozen tiles per slide keep the test quick
        write_tiles(tiles, dataclasses.replace(some, coords=some.coords[:12], tissue_fraction=None))
    builds = []
    monkeypatch.setattr(
        extract_module, "create_encoder", lambda *a, **k: builds.append(a) or create_encoder(*a, **k)
    )
    config = mobilenet_config(mobilenet_weights)
    facts = extract_cohort(
        table, tmp_path / "tiles", tmp_path / "bags", config, skip_errors=True, progress=False
    )
    assert len(facts) == 2 and not facts["skipped"].any() and (facts["n_tiles"] == 12).all()
    assert len(builds) == 1  # one model for all slides
    failures = pd.read_csv(tmp_path / "bags" / "failures.csv")
    assert failures["slide_id"].tolist() == [table["slide_id"].iloc[2]]
    assert failures["stage"].tolist() == ["extract"] and "does not exist" in failures["error"].iloc[0]
    for slide_id in table["slide_id"].iloc[:2]:
        assert read_bag(tmp_path / "bags" / f"{slide_id}.h5").dim == 1280
    with pytest.raises(PathmilError, match="does not exist"):  # without --skip-errors the first failure stops
        extract_cohort(table, tmp_path / "tiles", tmp_path / "bags", config, progress=False)
    assert len(builds) == 1  # the bags already there are current: no model is built
    argv = ["extract", "--cohort", str(tmp_path / "cohort.csv"), "--tiles-dir", str(tmp_path / "tiles")]
    argv += ["--out-dir", str(tmp_path / "bags"), "--encoder", "mobilenet_v2", "--skip-errors"]
    assert main([*argv, "--weights", str(mobilenet_weights)]) == 0
    assert len(builds) == 1
