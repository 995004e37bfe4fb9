"""A script's config is a commented dataclass; this turns it into CLI flags and back.

Each field becomes ``--kebab-case-name`` with its default in the help. Field
metadata carries ``help`` and, for enums, ``choices``; booleans become
``--flag/--no-flag``. The resolved config is what a run writes to meta.json.

Flags that several scripts share are declared once, in a group (a
:class:`ConfigGroup` dataclass with a ``check()`` of its own fields) that each
script's ``Config`` mixes in: data and split (:class:`DataConfig`), device
(:class:`DeviceConfig`), run form (:class:`FormConfig`), the training loop
(:class:`LoopConfig`, :class:`FineTuneConfig`), the embedding step
(:class:`EmbeddingConfig`) and a timm backbone (:class:`TimmModelConfig`). A script declares only its own fields, may give a
shared flag its own default or help with :func:`override`, and its
``check_config`` calls :func:`check_groups` before its own checks.

Example:
    >>> @dataclass
    ... class Config:
    ...     lr: float = field(default=1e-3, metadata={"help": "peak learning rate"})
    >>> parser = argparse.ArgumentParser()
    >>> add_config_args(parser, Config)
    >>> config_from_args(Config, parser.parse_args(["--lr", "0.1"])).lr
    0.1
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from utils.data.split import SplitParams
from utils.embedding.views import TTA_GROUPS, tta_views
from utils.errors import KitError
from utils.paths import user_path

C = TypeVar("C")

_OVERRIDE = "override"  # field metadata key: the field re-sets a group's flag (see override())


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_at_least(cfg: Any, names: tuple[str, ...], low: int = 1) -> None:
    """Raise a KitError naming the flag for the first of ``names`` whose value is below ``low``."""
    for name in names:
        if getattr(cfg, name) < low:
            raise KitError(f"{_flag(name)} {getattr(cfg, name)}: at least {low}")


def override(default: Any, help_text: str | None = None) -> Any:
    """A script's own default (and, given ``help_text``, its own help) for a flag a group declares.

    The flag keeps the group's type, metavar, choices and check. Use it as the field's default::

        epochs: int = override(20, "training epochs (0: zero-shot)")
    """
    meta = {_OVERRIDE: True, **({"help": help_text} if help_text is not None else {})}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


def field_metadata(cls: type, name: str) -> dict[str, Any]:
    """The metadata of field ``name`` of ``cls``: the declaring group's, updated by any :func:`override`.

    Raises:
        TypeError: an override of a field that no base class declares.
    """
    meta: dict[str, Any] = {}
    declared = False
    for klass in reversed(cls.__mro__):
        f = vars(klass).get("__dataclass_fields__", {}).get(name)
        if f is not None:
            declared = declared or not f.metadata.get(_OVERRIDE)
            meta.update(f.metadata)
    if not declared:
        raise TypeError(f"{cls.__name__}.{name}: override() of a field no group declares; declare it with field()")
    meta.pop(_OVERRIDE, None)
    return meta


def add_config_args(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add one flag per dataclass field of ``cls`` to ``parser`` (a ``Path`` field takes :func:`user_path`)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        meta = field_metadata(cls, f.name)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        kind = hints[f.name]
        helptext = meta.get("help", "")
        if kind is bool:
            parser.add_argument(
                _flag(f.name),
                action=argparse.BooleanOptionalAction,
                default=default,
                help=f"{helptext} (default: {default})",
            )
            continue
        kwargs: dict[str, Any] = {"default": default, "help": f"{helptext} (default: %(default)s)"}
        origin = typing.get_origin(kind)
        args = typing.get_args(kind)
        if origin in (list, tuple):
            kwargs["nargs"] = "*" if origin is list else len(args)
            kwargs["type"] = args[0]
        elif origin is typing.Union or type(None) in args:
            inner = [a for a in args if a is not type(None)][0]
            kwargs["type"] = inner
        else:
            kwargs["type"] = kind
        if kwargs["type"] is Path:
            kwargs["type"] = user_path
        if "choices" in meta:
            kwargs["choices"] = meta["choices"]
        kwargs["metavar"] = meta.get("metavar", f.name.split("_")[-1].upper())
        if "choices" in meta:
            kwargs.pop("metavar")
        parser.add_argument(_flag(f.name), **kwargs)


def config_from_args(cls: type[C], args: argparse.Namespace) -> C:
    """Build ``cls`` from the parsed flags (only its own fields are taken)."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    for key, val in values.items():
        if isinstance(val, list) and typing.get_origin(typing.get_type_hints(cls)[key]) is tuple:
            values[key] = tuple(val)
    return cls(**values)


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """A JSON-ready dict of a config dataclass (paths as strings)."""
    out = {}
    for key, val in dataclasses.asdict(cfg).items():
        out[key] = str(val) if isinstance(val, Path) else val
    return out


class ConfigGroup:
    """Flags declared once and mixed into each script's ``Config``, with the checks of those flags.

    A group's ``check()`` looks at its own fields only; :func:`check_groups` runs
    the check of every group a config mixes in, so no script repeats one.
    """

    def check(self) -> None:
        """Raise a KitError naming the flag of a value no run can use (this group's fields only)."""


def check_groups(cfg: ConfigGroup) -> None:
    """Run the ``check()`` of every group ``cfg`` mixes in, each once, the most basic first.

    Raises:
        KitError: a number flag given NaN or infinity, or from the first group with a value no run can use.
    """
    check_finite(cfg)
    for klass in reversed(type(cfg).__mro__):
        own = vars(klass).get("check")
        if own is not None and issubclass(klass, ConfigGroup):
            own(cfg)
    if isinstance(getattr(cfg, "run_name", None), str):  # every script's own field, one rule
        check_run_name(cfg.run_name)


def check_finite(cfg: Any) -> None:
    """Every float flag (and every value of a list of floats) is a finite number: NaN passed every range check
    written as ``x < low`` and a training run met it as a NaN loss; infinity overflowed where it became a time.

    Raises:
        KitError: naming the flag and the value.
    """
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        values = value if isinstance(value, (list, tuple)) else [value]
        bad = [v for v in values if isinstance(v, float) and not math.isfinite(v)]
        if bad:
            raise KitError(f"{_flag(f.name)} {bad[0]}: must be a finite number")


# what the kit itself keeps in --runs: the face scripts' shared cache folder, the split, the image verdicts, day.py's files
RUNS_FOLDER_ENTRIES = ("face_cache", "split.json", "image_check.json", "day.json", "day.log", "report.html")


def check_run_name(name: str) -> None:
    """``--run-name`` names one folder inside ``--runs``: no path separators, not '.', '..' or hidden, not one of
    :data:`RUNS_FOLDER_ENTRIES` ('': the script's default).

    Raises:
        KitError: a name that would leave the runs folder, hide the run or write it into the kit's own files.
    """
    if name == "":
        return
    if "/" in name or "\\" in name or name.startswith(".") or name != name.strip() or "\0" in name:
        raise KitError(f"--run-name {name!r}: one folder name inside --runs (no '/', no leading '.', no surrounding spaces)")
    if name in RUNS_FOLDER_ENTRIES:
        raise KitError(f"--run-name {name!r}: the kit keeps its own {name} in --runs; choose another name")


@dataclass
class DataConfig(ConfigGroup):
    """Where the data and the runs are, and the validation split (the same for every model script)."""

    data: Path = field(default=Path("data"), metadata={"help": "competition data folder", "metavar": "DIR"})
    runs: Path = field(default=Path("runs"), metadata={"help": "where runs/<run-name>/ and split.json go", "metavar": "DIR"})
    # split: the same for every model script, or the ensemble cannot join them
    seed: int = field(default=0, metadata={"help": "seed for the split, init, sampling and augmentation"})
    val_fraction: float = field(default=0.2, metadata={"help": "share of training identities held out for validation"})
    query_domain: str = field(default="real", metadata={"help": "domains.csv value of query images"})

    def split_params(self) -> SplitParams:
        """The validation split these flags ask for."""
        return SplitParams(self.seed, self.val_fraction, self.query_domain)

    def check(self) -> None:
        if not 0.0 < self.val_fraction < 1.0:
            raise KitError(f"--val-fraction must be in (0, 1), got {self.val_fraction}")
        if not self.query_domain:
            raise KitError("--query-domain '': name the domains.csv value of the query images (default: real)")


@dataclass
class DeviceConfig(ConfigGroup):
    """The machine: which device runs the model, and how much is logged."""

    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda or cuda:N"})
    verbose: bool = field(default=False, metadata={"help": "debug logging"})
    # GPU box (docs/gpu.md): determinism and the DDP timeout; utils/seed.py, utils/distributed.py
    deterministic: bool = field(default=False, metadata={"help": "strict deterministic kernels (an op without one is an error naming it; cudnn.benchmark off); off: fastest kernels on CUDA"})
    dist_timeout_min: float = field(default=60.0, metadata={"help": "under torchrun: minutes a rank waits for the others (rank 0 alone reads the images and validates) before the job is killed", "metavar": "MIN"})

    def check(self) -> None:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise KitError(f"--device {self.device!r}: expected auto, cpu, cuda or cuda:N")
        if not self.dist_timeout_min > 0:
            raise KitError(f"--dist-timeout-min {self.dist_timeout_min}: must be a positive number of minutes")


@dataclass
class RunConfig(DeviceConfig, DataConfig):
    """Flags every model script shares; the split ones must agree across scripts.

    A script's ``Config`` subclasses this, so its own fields follow these.
    ``runs/split.json`` refuses a run whose split flags differ from the first.
    """


@dataclass
class FormConfig(ConfigGroup):
    """Flags of scripts whose runs can take the top-k form (their matrices are cosines of embeddings)."""

    # past this size a run stores embeddings + each query's top-K instead of the matrices (utils/runs/topk_run.py)
    matrix_limit: int = field(default=20_000 * 20_000, metadata={"help": "query x gallery cells up to which the full matrices are written; beyond, the top-k form", "metavar": "CELLS"})
    topk: int = field(default=100, metadata={"help": "candidates kept per query in the top-k form", "metavar": "K"})
    search_backend: str = field(default="exact", metadata={"help": "top-k search of that form: exact (chunked, bounded memory) or faiss", "choices": ["exact", "faiss"]})

    def run_form(self):
        """The :class:`utils.runs.model_run.RunForm` these flags ask for."""
        from utils.runs.model_run import RunForm

        if self.matrix_limit < 1 or self.topk < 10:
            raise KitError(f"--matrix-limit {self.matrix_limit} / --topk {self.topk}: the limit must be positive and K at least 10 (a top-10 needs it)")
        return RunForm(self.matrix_limit, self.topk, self.search_backend)

    def check(self) -> None:
        self.run_form()


@dataclass
class LoopConfig(ConfigGroup):
    """Flags of the shared training loop (utils/training/loop.py) and its M-per-class batches.

    A script sets its own defaults with :func:`override` (the group's are the loop's).
    """

    epochs: int = field(default=10, metadata={"help": "training epochs"})
    max_steps: int = field(default=0, metadata={"help": "stop after this many steps in total (0: no limit); for smoke tests"})
    batch_size: int = field(default=32, metadata={"help": "training batch size"})
    m_per_class: int = field(default=4, metadata={"help": "images per identity in each batch (divides --batch-size)", "metavar": "N"})
    lr: float = field(default=1e-3, metadata={"help": "peak learning rate"})
    weight_decay: float = field(default=0.05, metadata={"help": "AdamW weight decay"})
    warmup_epochs: float = field(default=1.0, metadata={"help": "linear warm-up length, then cosine decay"})
    grad_clip: float = field(default=1.0, metadata={"help": "clip the gradient norm to this (0: off)"})
    eval_every: int = field(default=1, metadata={"help": "score validation every N epochs and keep best.pt (0: never)"})
    patience: int = field(default=0, metadata={"help": "stop after N validations without a better score (0: never)", "metavar": "N"})
    resume: bool = field(default=False, metadata={"help": "continue from <run>/last.pt"})
    retrain: bool = field(default=False, metadata={"help": "train again even when last.pt holds a finished run with the same settings and training images"})

    def uses_m_per_class(self) -> bool:
        """Whether every batch holds --m-per-class images per identity (a script whose loss may not says when)."""
        return True

    def check(self) -> None:
        from utils.training.loop import LoopSettings  # torch: only the training scripts need it

        LoopSettings.from_config(self).check()
        check_at_least(self, ("batch_size", "m_per_class"))
        if self.batch_size < 2:  # BatchNorm (the backbones, the projection head) cannot train on one image
            raise KitError(f"--batch-size {self.batch_size}: at least 2 (BatchNorm needs two images per batch)")
        if self.lr < 0 or self.weight_decay < 0:
            raise KitError(f"--lr {self.lr} / --weight-decay {self.weight_decay}: must be >= 0 (AdamW refuses negative values)")
        if self.uses_m_per_class() and self.batch_size % self.m_per_class:
            raise KitError(f"--batch-size {self.batch_size} must be a multiple of --m-per-class {self.m_per_class}")


@dataclass
class FineTuneConfig(LoopConfig):
    """The loop's flags for scripts that fine-tune a backbone on the training images and embed with it."""

    aug_strength: float = field(default=1.0, metadata={"help": "scales colour/blur/rotation augmentation; 0 keeps crops and flips"})
    full_train: bool = field(default=False, metadata={"help": "train on the validation identities too (final test run; uses the last epoch)"})
    compile: bool = field(default=False, metadata={"help": "torch.compile the model for the final embedding (compile time first; pays on large galleries and GPUs)"})

    def check(self) -> None:
        if self.aug_strength < 0:
            raise KitError(f"--aug-strength {self.aug_strength}: must be >= 0 (0 keeps crops and flips)")


@dataclass
class EmbeddingConfig(ConfigGroup):
    """Flags of the shared embedding step: views, batch, precision and loader workers."""

    tta: list[str] = field(default_factory=lambda: ["flip"], metadata={"help": f"test-time view groups added to the identity, of {list(TTA_GROUPS)}; none: identity only"})
    embed_batch_size: int = field(default=64, metadata={"help": "images per embedding batch"})
    amp: bool = field(default=True, metadata={"help": "mixed precision on GPU (bf16 where supported)"})
    workers: int = field(default=-1, metadata={"help": "DataLoader worker processes (-1: half the usable cores, 1 to 8; 0: main process)"})

    def check(self) -> None:
        check_at_least(self, ("embed_batch_size",))
        from utils.device import resolve_workers  # torch: imported only by the scripts that embed, not by submit.py

        resolve_workers(self.workers)
        tta_views(self.tta)


@dataclass
class TimmModelConfig(ConfigGroup):
    """The timm backbone and its square input side (the CLIP scripts' --model and --img-size are open_clip's, their own)."""

    # any timm name; a script gives its own default with override()
    model: str = field(default="resnet50", metadata={"help": "timm model name"})
    img_size: int = field(default=224, metadata={"help": "square input side in pixels"})
    # the pattern the --model error suggests to timm.list_models(); a script whose family differs re-sets it (no flag)
    model_glob = "*resnet*"

    def check(self) -> None:
        import timm  # imported only by the scripts that build a timm model

        if not timm.is_model(self.model):
            raise KitError(f"--model {self.model!r}: not a timm model; list them with timm.list_models({self.model_glob!r})")
        check_at_least(self, ("img_size",))
