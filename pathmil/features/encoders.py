"""Frozen tile encoders: a registry in the style of timm's ``create_model``.

``create_encoder(name, weights=None)`` returns an :class:`Encoder`: the network in eval mode with gradients
off, the output dimension, the preprocessing the model card prescribes (input size, resize and centre-crop
rule, mean and std), and where its weights came from (path and SHA-256), so every bag file can say exactly
which features it holds.

Weights never come from the network at run time: a ``weights`` file, or else an existing Hugging Face cache
(``$HF_HOME/hub/models--ORG--NAME/snapshots/*/FILE``) or torch hub cache (``$TORCH_HOME/hub/checkpoints``).
A missing file is a :class:`~pathmil.errors.PathmilError` naming the file and where to get it. Random
weights only when asked for (``random_init=True``); the bag records it so nobody mistakes random features for
real ones.

Entries (architecture arguments, normalisation and embedding rule as in each model card):

- ``resnet50_trunc``: ImageNet ResNet-50 cut after layer3, global average pool, 1024-d (CLAM; Lu et al.,
  Nat. Biomed. Eng. 2021);
- ``mobilenet_v2``: torchvision's ImageNet MobileNetV2, pooled, 1280-d (Sandler et al., CVPR 2018);
- ``timm:<model_name>``: any timm architecture with ``num_classes=0`` and timm's own eval preprocessing;
- ``uni`` (Chen et al., Nat. Med. 2024), ``uni2_h``, ``virchow2`` (Zimmermann et al., arXiv:2408.00738),
  ``h_optimus_0``/``h_optimus_1`` (Saillard et al., Bioptimus 2024), ``prov_gigapath`` (Xu et al., Nature
  2024), ``phikon_v2`` (Filiot et al., arXiv:2409.09173), ``conch_v1_5`` (Ding et al., TITAN,
  arXiv:2411.19666).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pathmil.errors import PathmilError
from pathmil.fileio import file_sha256, load_tensors_safely

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HOPTIMUS_MEAN = (0.707223, 0.578729, 0.703617)
HOPTIMUS_STD = (0.211883, 0.230117, 0.177517)
RANDOM_INIT_SEED = 0  # random weights are reproducible, so random-feature baselines are too


@dataclass(frozen=True)
class Preprocess:
    """What the model expects: the square tile resized to ``resize_px``, centre-cropped to ``input_px``,
    scaled to [0, 1] and normalised by ``mean``/``std`` per RGB channel."""

    input_px: int
    resize_px: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


@dataclass
class Encoder:
    """A frozen encoder ready for inference: ``model(x)`` maps B x 3 x H x W normalised images to B x dim."""

    name: str
    model: nn.Module
    dim: int
    preprocess: Preprocess
    weights_sha256: str  # "" for random weights
    random_init: bool
    weights_path: str | None = None
    convolutional: bool = False  # a CNN: channels_last memory layout pays off
    half: str = "bf16"  # the 16-bit autocast type that keeps per-tile cosine similarity to fp32 >= 0.999


@dataclass(frozen=True)
class EncoderSpec:
    """How to build one registry entry and where its weights live."""

    build: Callable[[], nn.Module]  # the architecture with random weights
    dim: int
    preprocess: Preprocess
    files: tuple[str, ...]  # weight file names, in order of preference
    hf_repo: str | None = None  # Hugging Face repository holding ``files``
    torch_hub: bool = False  # also look in $TORCH_HOME/hub/checkpoints
    load: Callable[[nn.Module, dict[str, torch.Tensor]], None] | None = None  # default: strict load
    convolutional: bool = False
    timm_name: str | None = None  # set for ``timm:<name>``: timm loads the file itself
    half: str = "bf16"  # 16-bit autocast type that stays faithful (cosine >= 0.999 to fp32 per tile)


_REGISTRY: dict[str, Callable[[], EncoderSpec]] = {}


def register_encoder(name: str) -> Callable[[Callable[[], EncoderSpec]], Callable[[], EncoderSpec]]:
    """Decorator adding a function that returns an :class:`EncoderSpec` to the registry under ``name``."""

    def add(fn: Callable[[], EncoderSpec]) -> Callable[[], EncoderSpec]:
        if name in _REGISTRY:
            raise ValueError(f"encoder {name} is registered twice")
        _REGISTRY[name] = fn
        return fn

    return add


def list_encoders() -> list[str]:
    """The registered names (``timm:<model_name>`` works on top of these)."""
    return sorted(_REGISTRY)


def encoder_spec(name: str) -> EncoderSpec:
    """The spec of a registered name or of ``timm:<model_name>``."""
    if name.startswith("timm:"):
        return _timm_spec(name.removeprefix("timm:"))
    if name not in _REGISTRY:
        raise PathmilError(
            f"unknown encoder '{name}'; choose one of {', '.join(list_encoders())} or timm:<model_name>"
        )
    return _REGISTRY[name]()


def create_encoder(
    name: str,
    weights: str | os.PathLike | None = None,
    random_init: bool = False,
    device: str | torch.device = "cpu",
    sha256: str | None = None,
) -> Encoder:
    """Build encoder ``name`` with its weights (``weights``, else the local caches), frozen and in eval mode.

    ``random_init=True`` skips the weights and seeds the initialisation, for tests and baselines only.
    ``device="meta"`` (with ``random_init``) builds the architecture without allocating it: shape checks.
    ``sha256`` is the weights file's digest when the caller has it already (hashing GBs takes seconds).
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here downloads; keep timm and the hub offline too
    spec = encoder_spec(name)
    if random_init:
        if weights is not None:
            raise PathmilError("give either --weights or --random-init, not both")
        with torch.random.fork_rng(devices=[]), torch.device(device):
            torch.manual_seed(RANDOM_INIT_SEED)
            model = spec.build()
        path, sha = None, ""
    else:
        path = resolve_weights(name, spec, weights)
        sha = sha256 or file_sha256(path)
        model = _build_with_weights(name, spec, path)
    model.eval().requires_grad_(False)
    return Encoder(
        name=name,
        model=model,
        dim=spec.dim,
        preprocess=spec.preprocess,
        weights_sha256=sha,
        random_init=random_init,
        weights_path=str(path) if path else None,
        convolutional=spec.convolutional,
        half=spec.half,
    )


def encoder_gflops(name: str) -> float:
    """Floating-point operations of encoding one tile, in GFLOP (a multiply-add counts two), as counted by
    ``torch.utils.flop_counter.FlopCounterMode`` on the architecture built on the meta device (no memory,
    no weights). What the workflow's runtime model divides by a device's FLOP/s (``x-pathmil`` facts of the
    generated schema). Raises PathmilError for an unknown name."""
    from torch.utils.flop_counter import FlopCounterMode

    encoder = create_encoder(name, random_init=True, device="meta")
    side = encoder.preprocess.input_px
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        encoder.model(torch.empty(1, 3, side, side, device="meta"))
    return counter.get_total_flops() / 1e9


# ------------------------------------------------------------------------------------------ weights


def resolve_weights(name: str, spec: EncoderSpec, weights: str | os.PathLike | None) -> Path:
    """The weights file to load: ``weights`` if given, else the first of ``spec.files`` in a local cache."""
    if weights is not None:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise PathmilError(f"weights file {path} for encoder {name} does not exist; check --weights")
        return path
    cached = _cached_files(spec)
    if not cached:
        raise PathmilError(_missing_weights_message(name, spec))
    return cached[0]


def _cached_files(spec: EncoderSpec) -> list[Path]:
    """Existing copies of the spec's files in the Hugging Face and torch hub caches (no download)."""
    found = []
    if spec.hf_repo:
        from huggingface_hub import try_to_load_from_cache

        for filename in spec.files:
            hit = try_to_load_from_cache(spec.hf_repo, filename)
            if isinstance(hit, str) and Path(hit).is_file():
                found.append(Path(hit))
    if spec.torch_hub:
        checkpoints = Path(torch.hub.get_dir()) / "checkpoints"
        found += [checkpoints / f for f in spec.files if (checkpoints / f).is_file()]
    return found


def _missing_weights_message(name: str, spec: EncoderSpec) -> str:
    wanted = " or ".join(spec.files)
    where = []
    if spec.hf_repo:
        from huggingface_hub import constants

        where.append(
            f"download it from https://huggingface.co/{spec.hf_repo} (file {spec.files[0]}) into the Hugging "
            f"Face cache {constants.HF_HUB_CACHE}/models--{spec.hf_repo.replace('/', '--')}/snapshots/*/"
        )
    if spec.torch_hub:
        where.append(f"put it in the torch hub cache {Path(torch.hub.get_dir()) / 'checkpoints'}")
    return (
        f"encoder {name} needs its weights {wanted}: {'; or '.join(where)}; or pass --weights PATH "
        "(or --random-init for a test run)"
    )


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state dict from .safetensors, .pth, .pt or .bin; unwraps ``{"state_dict": ...}``/``{"model": ...}``."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except Exception as err:  # any reader error means the file is not usable weights
            raise PathmilError(f"weights file {path} cannot be read ({err}); download it again") from None
    else:
        state = load_tensors_safely(path, what="weights file")
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict) and len(state) <= 3:
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise PathmilError(f"weights file {path} does not hold a state dict of tensors")
    return state


def strict_load(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """``load_state_dict(strict=True)`` with a one-line error that names what does not fit."""
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shapes differ
        raise PathmilError(
            f"they do not fit the architecture ({str(err).splitlines()[-1].strip()})"
        ) from None
    if missing or unexpected:
        raise PathmilError(
            f"they do not fit the architecture: {len(missing)} missing (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})"
        )


def _build_with_weights(name: str, spec: EncoderSpec, path: Path) -> nn.Module:
    if spec.timm_name is not None:
        import timm

        try:
            return timm.create_model(
                spec.timm_name, pretrained=True, num_classes=0, pretrained_cfg_overlay={"file": str(path)}
            )
        except (RuntimeError, KeyError, ValueError) as err:
            raise PathmilError(
                f"weights {path} cannot be loaded into encoder {name}: {str(err).splitlines()[0]}"
            ) from None
    model = spec.build()
    state = load_state_dict_file(path)
    try:
        (spec.load or strict_load)(model, state)
    except (PathmilError, KeyError) as err:
        raise PathmilError(
            f"weights {path} cannot be loaded into encoder {name}: {err}; check that the file is "
            f"{' or '.join(spec.files)}" + (f" from {spec.hf_repo}" if spec.hf_repo else "")
        ) from None
    return model


# ------------------------------------------------------------------------------------------- CNNs


class TruncatedResNet50(nn.Module):
    """ResNet-50 up to layer3 (1024 channels) and global average pooling, as CLAM's ``resnet50_trunc``.

    Submodules keep torchvision's names, so torchvision and timm ResNet-50 state dicts load unchanged once
    ``layer4`` and ``fc`` are dropped.
    """

    def __init__(self) -> None:
        super().__init__()
        import torchvision

        full = torchvision.models.resnet50()
        self.conv1, self.bn1, self.relu, self.maxpool = full.conv1, full.bn1, full.relu, full.maxpool
        self.layer1, self.layer2, self.layer3 = full.layer1, full.layer2, full.layer3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer3(self.layer2(self.layer1(x)))
        return x.mean(dim=(2, 3))


class MobileNetV2Features(nn.Module):
    """torchvision's MobileNetV2 without its classifier: the 1280 channels, average-pooled."""

    def __init__(self) -> None:
        super().__init__()
        import torchvision

        self.features = torchvision.models.mobilenet_v2().features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x).mean(dim=(2, 3))


def _drop_prefixes(*prefixes: str) -> Callable[[nn.Module, dict[str, torch.Tensor]], None]:
    """A loader that ignores the parameters of the parts we cut off (e.g. ``layer4``, ``fc``)."""

    def load(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        strict_load(model, {k: v for k, v in state.items() if not k.startswith(prefixes)})

    return load


@register_encoder("resnet50_trunc")
def _resnet50_trunc() -> EncoderSpec:
    return EncoderSpec(
        build=TruncatedResNet50,
        dim=1024,
        preprocess=Preprocess(input_px=224, resize_px=224),
        files=("resnet50-0676ba61.pth", "resnet50-19c8e357.pth", "model.safetensors", "pytorch_model.bin"),
        hf_repo="timm/resnet50.tv_in1k",
        torch_hub=True,
        load=_drop_prefixes("layer4.", "fc."),
        convolutional=True,
    )


@register_encoder("mobilenet_v2")
def _mobilenet_v2() -> EncoderSpec:
    return EncoderSpec(
        build=MobileNetV2Features,
        dim=1280,
        preprocess=Preprocess(input_px=224, resize_px=224),
        files=("mobilenet_v2-b0353104.pth", "mobilenet_v2-7ebf99e0.pth"),
        torch_hub=True,
        load=_drop_prefixes("classifier."),
        convolutional=True,
        half="fp16",  # bf16 drops per-tile cosine to 0.988 on real H&E; fp16 keeps 0.99996
    )


# ------------------------------------------------------------------------------------------- timm


def _timm_spec(model_name: str) -> EncoderSpec:
    """Any timm architecture, pooled (``num_classes=0``), with timm's eval preprocessing for it."""
    import timm
    from timm.data import resolve_model_data_config

    if not model_name or not timm.is_model(model_name.split(".")[0]):
        raise PathmilError(f"timm has no model '{model_name}'; see timm.list_models() for the names")
    with torch.device("meta"):
        probe = timm.create_model(model_name, pretrained=False, num_classes=0)
    config = resolve_model_data_config(probe)
    input_px = int(config["input_size"][-1])
    pretrained = timm.models.get_pretrained_cfg(model_name, allow_unregistered=True)
    return EncoderSpec(
        build=lambda: timm.create_model(model_name, pretrained=False, num_classes=0),
        dim=int(getattr(probe, "head_hidden_size", None) or probe.num_features),
        preprocess=Preprocess(
            input_px=input_px,
            resize_px=math.floor(input_px / float(config.get("crop_pct") or 1.0)),
            mean=tuple(config["mean"]),
            std=tuple(config["std"]),
        ),
        files=("model.safetensors", "pytorch_model.bin"),
        hf_repo=getattr(pretrained, "hf_hub_id", None) if pretrained else None,
        convolutional=not hasattr(probe, "patch_embed"),
        timm_name=model_name,
    )


# ------------------------------------------------------------------------------- foundation models


class ClassAndMeanPatchTokens(nn.Module):
    """Virchow's embedding: the class token concatenated with the mean of the patch tokens, registers
    excluded (Vorontsov et al., Nat. Med. 2024; Zimmermann et al., arXiv:2408.00738)."""

    def __init__(self, vit: nn.Module) -> None:
        super().__init__()
        self.vit = vit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.vit(x)  # B x (1 + registers + patches) x D, after the final norm
        patches = tokens[:, self.vit.num_prefix_tokens :]
        return torch.cat([tokens[:, 0], patches.mean(dim=1)], dim=-1)


def _timm_vit(arch: str, **kwargs: Any) -> nn.Module:
    import timm

    return timm.create_model(arch, pretrained=False, num_classes=0, **kwargs)


def _swiglu() -> dict[str, Any]:
    import timm

    return {"mlp_layer": timm.layers.SwiGLUPacked, "act_layer": nn.SiLU}


@register_encoder("uni")
def _uni() -> EncoderSpec:
    """UNI (MahmoodLab/UNI): ViT-L/16, layer scale, class token, 1024-d."""
    return EncoderSpec(
        build=lambda: _timm_vit(
            "vit_large_patch16_224", img_size=224, patch_size=16, init_values=1e-5, dynamic_img_size=True
        ),
        dim=1024,
        preprocess=Preprocess(input_px=224, resize_px=224),
        files=("pytorch_model.bin",),
        hf_repo="MahmoodLab/UNI",
    )


@register_encoder("uni2_h")
def _uni2_h() -> EncoderSpec:
    """UNI2-h (MahmoodLab/UNI2-h): ViT-H/14 (1536-d, 24 blocks), SwiGLU, 8 registers, class token, 1536-d."""
    return EncoderSpec(
        build=lambda: _timm_vit(
            "vit_giant_patch14_224",
            img_size=224,
            patch_size=14,
            depth=24,
            num_heads=24,
            init_values=1e-5,
            embed_dim=1536,
            mlp_ratio=2.66667 * 2,
            no_embed_class=True,
            reg_tokens=8,
            dynamic_img_size=True,
            **_swiglu(),
        ),
        dim=1536,
        preprocess=Preprocess(input_px=224, resize_px=224),
        files=("pytorch_model.bin",),
        hf_repo="MahmoodLab/UNI2-h",
    )


@register_encoder("virchow2")
def _virchow2() -> EncoderSpec:
    """Virchow2 (paige-ai/Virchow2): ViT-H/14, SwiGLU, 4 registers; class token + mean patch token, 2560-d."""
    return EncoderSpec(
        build=lambda: ClassAndMeanPatchTokens(
            _timm_vit(
                "vit_huge_patch14_224",
                img_size=224,
                init_values=1e-5,
                mlp_ratio=5.3375,
                reg_tokens=4,
                global_pool="",
                dynamic_img_size=True,
                **_swiglu(),
            )
        ),
        dim=2560,
        preprocess=Preprocess(input_px=224, resize_px=224),
        files=("model.safetensors", "pytorch_model.bin"),
        hf_repo="paige-ai/Virchow2",
        load=lambda model, state: strict_load(model.vit, state),
    )


def _h_optimus(repo: str) -> EncoderSpec:
    """H-optimus-0/-1 (bioptimus): DINOv2 ViT-g/14 with 4 registers, class token, 1536-d, own mean/std."""
    return EncoderSpec(
        build=lambda: _timm_vit(
            "vit_giant_patch14_reg4_dinov2",
            img_size=224,
            init_values=1e-5,
            global_pool="token",
            dynamic_img_size=False,
        ),
        dim=1536,
        preprocess=Preprocess(input_px=224, resize_px=224, mean=HOPTIMUS_MEAN, std=HOPTIMUS_STD),
        files=("model.safetensors", "pytorch_model.bin"),
        hf_repo=repo,
    )


@register_encoder("h_optimus_0")
def _h_optimus_0() -> EncoderSpec:
    return _h_optimus("bioptimus/H-optimus-0")


@register_encoder("h_optimus_1")
def _h_optimus_1() -> EncoderSpec:
    return _h_optimus("bioptimus/H-optimus-1")


@register_encoder("prov_gigapath")
def _prov_gigapath() -> EncoderSpec:
    """Prov-GigaPath tile encoder: DINOv2 ViT-g with 16 px patches, class token, 1536-d; resize 256, crop 224."""
    return EncoderSpec(
        build=lambda: _timm_vit(
            "vit_giant_patch14_dinov2",
            img_size=224,
            in_chans=3,
            patch_size=16,
            embed_dim=1536,
            depth=40,
            num_heads=24,
            init_values=1e-5,
            mlp_ratio=5.33334,
        ),
        dim=1536,
        preprocess=Preprocess(input_px=224, resize_px=256),
        files=("pytorch_model.bin",),
        hf_repo="prov-gigapath/prov-gigapath",
    )


@register_encoder("phikon_v2")
def _phikon_v2() -> EncoderSpec:
    """Phikon-v2 (owkin/phikon-v2): DINOv2 ViT-L/16 without registers, class token, 1024-d.

    Its weights are in Hugging Face transformers' ``Dinov2Model`` naming; :func:`dinov2_hf_to_timm` maps
    them onto the timm module, so transformers is not needed.
    """
    return EncoderSpec(
        build=lambda: _timm_vit("vit_large_patch14_dinov2", img_size=224, patch_size=16),
        dim=1024,
        preprocess=Preprocess(input_px=224, resize_px=224),
        files=("model.safetensors", "pytorch_model.bin"),
        hf_repo="owkin/phikon-v2",
        load=lambda model, state: strict_load(model, dinov2_hf_to_timm(state, model)),
    )


# Attention parameter names of transformers' Dinov2 layers: as saved by transformers 4 (the released
# Phikon-v2 file), and as transformers 5 names them in memory and in files it saves.
DINOV2_ATTENTION_NAMES = {
    "v4": (
        "attention.attention.query",
        "attention.attention.key",
        "attention.attention.value",
        "attention.output.dense",
    ),
    "v5": ("attention.q_proj", "attention.k_proj", "attention.v_proj", "attention.o_proj"),
}


def dinov2_hf_to_timm(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Rename a transformers ``Dinov2Model`` state dict (no SwiGLU, no registers) to timm's ViT names.

    Query, key and value projections are stacked into timm's fused ``qkv``; a position table for another
    grid is resampled once to the model's grid, bicubic without antialiasing as transformers does at run
    time, so inputs of the model's size see the same positions as in transformers.
    """
    state = {k.removeprefix("dinov2."): v for k, v in state.items()}
    out = {
        "cls_token": state["embeddings.cls_token"],
        "patch_embed.proj.weight": state["embeddings.patch_embeddings.projection.weight"],
        "patch_embed.proj.bias": state["embeddings.patch_embeddings.projection.bias"],
        "norm.weight": state["layernorm.weight"],
        "norm.bias": state["layernorm.bias"],
    }
    version = "v5" if "encoder.layer.0.attention.q_proj.weight" in state else "v4"
    *qkv_names, proj_name = DINOV2_ATTENTION_NAMES[version]
    depth = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("encoder.layer."))
    for i in range(depth):
        src, dst = f"encoder.layer.{i}.", f"blocks.{i}."
        for kind in ("weight", "bias"):
            out[dst + f"attn.qkv.{kind}"] = torch.cat([state[f"{src}{name}.{kind}"] for name in qkv_names])
            out[dst + f"attn.proj.{kind}"] = state[f"{src}{proj_name}.{kind}"]
            for part in ("norm1", "norm2", "mlp.fc1", "mlp.fc2"):
                out[dst + f"{part}.{kind}"] = state[f"{src}{part}.{kind}"]
        out[dst + "ls1.gamma"] = state[src + "layer_scale1.lambda1"]
        out[dst + "ls2.gamma"] = state[src + "layer_scale2.lambda1"]
    grid = model.patch_embed.grid_size
    out["pos_embed"] = _resample_positions(state["embeddings.position_embeddings"], grid, mode="size")
    return out


def _resample_positions(pos: torch.Tensor, grid: tuple[int, int], mode: str, prefix: int = 1) -> torch.Tensor:
    """A 1 x (prefix + h*w) x D position table resampled bicubically to ``grid``.

    ``mode="size"`` targets the grid exactly (transformers, timm); ``mode="dino"`` reproduces the DINO/iBOT
    rule that scales by (grid + 0.1) / old grid, which the CONCH v1.5 reference code applies at run time.
    """
    old = math.isqrt(pos.shape[1] - prefix)
    if (old, old) == tuple(grid):
        return pos
    table = pos[:, prefix:].reshape(1, old, old, -1).permute(0, 3, 1, 2).float()
    if mode == "dino":
        scale = ((grid[0] + 0.1) / old, (grid[1] + 0.1) / old)
        table = nn.functional.interpolate(table, scale_factor=scale, mode="bicubic")
    else:
        table = nn.functional.interpolate(table, size=grid, mode="bicubic", antialias=False)
    table = table.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], -1).to(pos.dtype)
    return torch.cat([pos[:, :prefix], table], dim=1)


class AttentionalPooler(nn.Module):
    """CoCa's attentional pooler (Yu et al., 2022) with learned queries, as in CONCH's vision tower:
    pre-normed queries attend over the normed tokens with bias-free projections."""

    def __init__(self, dim: int, context_dim: int, heads: int = 8, queries: int = 1) -> None:
        super().__init__()
        self.heads = heads
        self.query = nn.Parameter(torch.randn(queries, dim))
        self.ln_k = nn.LayerNorm(context_dim)
        self.ln_q = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_kv = nn.Linear(context_dim, dim * 2, bias=False)
        self.to_out = nn.Linear(dim, dim, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        batch = tokens.shape[0]
        q = self.to_q(self.ln_q(self.query)).expand(batch, -1, -1)
        k, v = self.to_kv(self.ln_k(tokens)).chunk(2, dim=-1)
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in (q, k, v))
        pooled = nn.functional.scaled_dot_product_attention(q, k, v)
        return self.to_out(pooled.transpose(1, 2).flatten(2))


class ConchVisionTower(nn.Module):
    """CONCH v1.5's image encoder: ViT-L/16 at 448 px (layer scale 1.0), attentional pooling of all tokens
    to one 768-d query, LayerNorm: the contrastive image embedding before projection (TITAN, Ding et al.,
    arXiv:2411.19666; structure as in the Mahmood lab's TRIDENT ``conch_v15`` encoder)."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = _timm_vit("vit_large_patch16_224", img_size=448, init_values=1.0)
        self.attn_pool_contrast = AttentionalPooler(768, 1024, heads=8, queries=1)
        self.ln_contrast = nn.LayerNorm(768)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.trunk.forward_features(x)  # B x (1 + patches) x 1024, after the final norm
        return self.ln_contrast(self.attn_pool_contrast(tokens)[:, 0])


def _load_conch(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """The reference loader resamples the position table to the 224 px grid (bilinear), and its ViT then
    resamples that to the 448 px grid at every call (DINO rule); both steps are done once here."""
    from timm.layers import resample_abs_pos_embed

    state = dict(state)
    pos = resample_abs_pos_embed(
        state["trunk.pos_embed"], new_size=(14, 14), interpolation="bilinear", antialias=False
    )
    state["trunk.pos_embed"] = _resample_positions(pos, model.trunk.patch_embed.grid_size, mode="dino")
    strict_load(model, state)


@register_encoder("conch_v1_5")
def _conch_v1_5() -> EncoderSpec:
    return EncoderSpec(
        build=ConchVisionTower,
        dim=768,
        preprocess=Preprocess(input_px=448, resize_px=448),
        files=("pytorch_model_vision.bin",),
        hf_repo="MahmoodLab/conchv1_5",
        load=_load_conch,
    )
