"""A script's config is a commented dataclass; this turns it into CLI flags and back.

Each field becomes ``--kebab-case-name`` with its default in the help. Field
metadata carries ``help`` and, for enums, ``choices``; booleans become
``--flag/--no-flag``. The resolved config is what a run writes to meta.json.

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
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from utils.data.split import SplitParams
from utils.errors import KitError

C = TypeVar("C")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_at_least(cfg: Any, names: tuple[str, ...], low: int = 1) -> None:
    """Raise a KitError naming the flag for the first of ``names`` whose value is below ``low``."""
    for name in names:
        if getattr(cfg, name) < low:
            raise KitError(f"{_flag(name)} {getattr(cfg, name)}: at least {low}")


def add_config_args(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add one flag per dataclass field of ``cls`` to ``parser``."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        meta = dict(f.metadata)
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


@dataclass
class RunConfig:
    """Flags every model script shares; the split ones must agree across scripts.

    A script's ``Config`` subclasses this, so its own fields follow these.
    ``runs/split.json`` refuses a run whose split flags differ from the first.
    """

    data: Path = field(default=Path("data"), metadata={"help": "competition data folder", "metavar": "DIR"})
    runs: Path = field(default=Path("runs"), metadata={"help": "where runs/<run-name>/ and split.json go", "metavar": "DIR"})
    # split: the same for every model script, or the ensemble cannot join them
    seed: int = field(default=0, metadata={"help": "seed for the split, init, sampling and augmentation"})
    val_fraction: float = field(default=0.2, metadata={"help": "share of training identities held out for validation"})
    query_domain: str = field(default="real", metadata={"help": "domains.csv value of query images"})
    # machine
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda or cuda:N"})
    verbose: bool = field(default=False, metadata={"help": "debug logging"})
    # GPU box (docs/gpu.md): determinism and the DDP timeout; utils/seed.py, utils/training/distributed.py
    deterministic: bool = field(default=False, metadata={"help": "strict deterministic kernels (an op without one is an error naming it; cudnn.benchmark off); off: fastest kernels on CUDA"})
    dist_timeout_min: float = field(default=60.0, metadata={"help": "under torchrun: minutes a rank waits for the others (rank 0 alone reads the images and validates) before the job is killed", "metavar": "MIN"})

    def split_params(self) -> SplitParams:
        """The validation split these flags ask for."""
        return SplitParams(self.seed, self.val_fraction, self.query_domain)


@dataclass
class FormConfig:
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
