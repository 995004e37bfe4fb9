"""What the weights folder can hold: one :class:`WeightSpec` per model the kit loads by tag.

A spec names the entry in the folder's manifest (``timm/resnet50.a1_in1k``,
``open_clip/ViT-L-14/openai``, ``facenet/vggface2``, ``hf/Salesforce/blip2-opt-2.7b``)
and where its files come from: a direct URL, or a Hugging Face repository whose
file list (with sizes and sha256) the hub's API gives.

:data:`DEFAULT_RECIPES` lists the weights the model scripts' default settings
load; keep it in step with their ``Config`` defaults (``tests/test_weights.py`` checks it).
"""

from __future__ import annotations

from dataclasses import dataclass

from utils.errors import KitError

FACENET_RELEASES = {
    "vggface2": "https://github.com/timesler/facenet-pytorch/releases/download/v2.2.9/20180402-114759-vggface2.pt",
    "casia-webface": "https://github.com/timesler/facenet-pytorch/releases/download/v2.2.9/20180408-102900-casia-webface.pt",
}
KINDS = ("timm", "open_clip", "facenet", "hf")


@dataclass(frozen=True)
class WeightSpec:
    """One entry of the weights folder.

    Attributes:
        name: manifest key and folder below the weights folder.
        kind: timm, open_clip, facenet or hf (a transformers folder).
        url: a direct download (one file), or '' for a hub repository.
        repo: Hugging Face repository id, for ``url == ''``.
        prefer: for a single-file entry from a repository, the file names to take, best first;
            empty: the whole repository (a ``save_pretrained`` folder).
        used_by: which scripts' defaults load it (for ``list`` and preflight).
    """

    name: str
    kind: str
    url: str = ""
    repo: str = ""
    prefer: tuple[str, ...] = ()
    used_by: str = ""

    @property
    def single_file(self) -> bool:
        return bool(self.url or self.prefer)


def timm_spec(model: str, used_by: str = "") -> WeightSpec:
    """The spec of timm's default pretrained weights of ``model``.

    Raises:
        KitError: not a timm model, or no pretrained weights on the hub.
    """
    import timm

    if not timm.is_model(model):
        raise KitError(f"--model {model!r}: not a timm model; list them with timm.list_models('*resnet*')")
    cfg = timm.models.get_pretrained_cfg(model)
    hub_id = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    if not hub_id:
        raise KitError(f"--model {model!r}: timm has no hub weights for it; pass --weights PATH or --weights none")
    return WeightSpec("timm/" + hub_id.removeprefix("timm/"), "timm", repo=hub_id, prefer=("model.safetensors", "pytorch_model.bin"), used_by=used_by)


def open_clip_spec(model: str, tag: str, used_by: str = "") -> WeightSpec | None:
    """The spec of an open_clip ``model`` + ``tag`` (both towers); None when open_clip has no hub copy of it."""
    import open_clip

    cfg = open_clip.get_pretrained_cfg(model, tag) if model in open_clip.list_models() else {}
    hub = (cfg or {}).get("hf_hub", "").strip("/")
    if not hub:
        return None
    repo = hub
    if hub.count("/") > 1:  # 'org/repo/file'
        org, name, file = hub.split("/", 2)
        repo, prefer = f"{org}/{name}", (file,)
    else:
        prefer = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
    return WeightSpec(f"open_clip/{model}/{tag}", "open_clip", repo=repo, prefer=prefer, used_by=used_by)


def facenet_spec(name: str, used_by: str = "") -> WeightSpec:
    """The spec of facenet-pytorch's release ``name`` (vggface2, casia-webface)."""
    if name not in FACENET_RELEASES:
        raise KitError(f"--weights {name!r}: not a FaceNet release; use one of {list(FACENET_RELEASES)}, none or a file")
    return WeightSpec(f"facenet/{name}", "facenet", url=FACENET_RELEASES[name], used_by=used_by)


def hf_spec(repo: str, used_by: str = "") -> WeightSpec:
    """The spec of a whole ``transformers`` repository (a captioner, a Hugging Face CLIP)."""
    return WeightSpec(f"hf/{repo}", "hf", repo=repo, used_by=used_by)


# (kind, model, tag, used by): the weights of every model script's default settings
DEFAULT_RECIPES: tuple[tuple[str, str, str, str], ...] = (
    ("facenet", "facenet", "vggface2", "infer_facenet.py"),
    ("timm", "resnet50", "default", "train_resnet.py, infer_cnn_features.py"),
    ("open_clip", "ViT-L-14", "openai", "train_clip_arcface.py, infer_caption_match.py"),
    ("open_clip", "ViT-B-32", "openai", "infer_clip_colour.py"),
    ("hf", "Salesforce/blip2-opt-2.7b", "", "infer_caption_match.py (captioner)"),
)


def spec_of(kind: str, model: str, tag: str, used_by: str = "") -> WeightSpec:
    """The spec of one recipe row.

    Raises:
        KitError: unknown kind, or a model/tag with no downloadable weights.
    """
    if kind == "facenet":
        return facenet_spec(tag, used_by)
    elif kind == "timm":
        return timm_spec(model, used_by)
    elif kind == "open_clip":
        spec = open_clip_spec(model, tag, used_by)
        if spec is None:
            raise KitError(f"open_clip {model} {tag}: no hub copy known to open_clip; pass --weights PATH")
        return spec
    elif kind == "hf":
        return hf_spec(model, used_by)
    else:
        raise KitError(f"weights kind {kind!r}: choose one of {list(KINDS)}")


def default_specs() -> list[WeightSpec]:
    """Every weight entry the model scripts' defaults load, in the order ``fetch`` downloads them."""
    return [spec_of(*row) for row in DEFAULT_RECIPES]
