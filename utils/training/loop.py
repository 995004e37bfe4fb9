"""The one training loop every training script calls.

A script builds what is its own (model, loss, optimiser groups, data
sampling) and hands it to a :class:`Trainer`, which does the rest the same
way for everyone:

- epochs and a step cap (``--max-steps``), linear warm-up + cosine decay on
  every optimiser group's own peak learning rate;
- mixed precision (bf16, or fp16 with a grad scaler) on GPU, gradient clipping;
- validation every N epochs, ``best.pt`` (best validation score) and
  ``last.pt`` (every epoch) with the full state: modules, optimiser, scaler,
  epoch, step, best score, evaluations without improvement, history, config,
  identities and kit version;
- ``--resume`` from ``last.pt``, checked against the flags that shape the model;
- training as a cache: a plain re-run whose ``last.pt`` holds a *finished* run with
  the same settings and the same training files reuses it instead of training again
  (``--retrain`` forces a new run);
- early stopping (``--patience``), and DDP: rank 0 logs and saves, every rank
  follows its decision to stop; validation runs on rank 0 alone, or on every rank
  when ``shared_evaluate`` says ``evaluate`` is a collective (each rank embeds its
  share, with rank 0's BatchNorm statistics handed to all first).

Which checkpoint to embed with is decided here too (:meth:`Trainer.final_checkpoint`):
``best.pt`` when this run (or the run it resumed) scored validation and
``--full-train`` is off, else ``last.pt``, else none (no training happened).

    trainer = Trainer(LoopSettings.from_config(cfg), run_dir=run_dir, modules={"model": backbone, "head": head},
                      step_module=Classifier(backbone, head, criterion), optimizer=optimizer, device=device,
                      amp=amp, config=config_to_dict(cfg), classes=task.classes, resume_keys=("model",),
                      evaluate=lambda: val_score(...))
    trainer.fit(loader, on_epoch=lambda epoch: setattr(train_set, "epoch", epoch))
    final = trainer.final_checkpoint()
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from utils.atomic import remove_stale_temps
from utils.data.image_dataset import log_unreadable
from utils.device import PRECISION_NAMES
from utils.distributed import DistInfo, broadcast
from utils.errors import KitError
from utils.progress import ProgressBar, QuietBar
from utils.runs.run_lock import acquire_run_lock
from utils.training.checkpoint import load_checkpoint, save_checkpoint
from utils.training.schedule import warmup_cosine

log = logging.getLogger(__name__)

NONDETERMINISTIC = "does not have a deterministic implementation"  # torch's message under use_deterministic_algorithms(True)
LOG_EVERY = 20  # steps between reading the loss back to the host (progress bar, NaN check); one sync each


@dataclass
class LoopSettings:
    """The loop's knobs; each is the script flag of the same name."""

    epochs: int = 10  # passes over the training set
    max_steps: int = 0  # stop after this many optimiser steps in total (0: no cap); smoke tests
    warmup_epochs: float = 1.0  # linear warm-up, then cosine decay to zero
    grad_clip: float = 1.0  # clip the gradient norm to this (0: off)
    eval_every: int = 1  # score validation every N epochs (0: never; then last.pt is used)
    patience: int = 0  # stop after N validations without a better score (0: never)
    resume: bool = False  # continue from last.pt
    retrain: bool = False  # train again even when last.pt holds a finished run with the same settings
    full_train: bool = False  # validation identities are trained on: never pick best.pt, never stop early

    @classmethod
    def from_config(cls, cfg: Any) -> "LoopSettings":
        """The loop's fields taken from a script's config (same names); absent ones keep their defaults."""
        return cls(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cls) if hasattr(cfg, f.name)})

    def check(self) -> None:
        """Raise a KitError naming the flag for values the loop cannot use."""
        for name in ("epochs", "max_steps", "eval_every", "patience"):
            if getattr(self, name) < 0:
                raise KitError(f"--{name.replace('_', '-')} {getattr(self, name)}: must be >= 0")
        if self.warmup_epochs < 0 or self.grad_clip < 0:
            raise KitError("--warmup-epochs and --grad-clip must be >= 0")


# config keys that do not change what training produces: a finished run that differs only in these is reused
VOLATILE_KEYS = frozenset({"resume", "retrain", "verbose", "workers", "device", "tta", "embed_batch_size", "data", "runs", "run_name", "amp",
                           "compile", "dist_timeout_min", "deterministic"})


@dataclass
class LoopState:
    """Where training stands; saved in every checkpoint."""

    epoch: int = 0  # the next epoch to run (0-based)
    step: int = 0
    best_score: float = -1.0  # -1: no validation scored yet
    bad_evals: int = 0
    history: list[dict[str, float]] = field(default_factory=list)


class Trainer:
    """Runs the loop for one script's model; see the module docstring.

    Args:
        settings: the loop's knobs.
        run_dir: where best.pt and last.pt go.
        modules: what a checkpoint holds, by key (e.g. ``{"model": backbone, "head": head}``).
        step_module: ``step_module(x, y)`` -> scalar loss (possibly DDP-wrapped);
            its unwrapped parameters are those trained.
        optimizer: with one group per learning rate; each group's ``lr`` is its peak.
        config: the resolved config (JSON-ready), stored in checkpoints.
        classes: the training identities, in label order.
        resume_keys: config keys that must match ``last.pt`` for ``--resume``.
        evaluate: () -> validation score; None: no validation.
        dist_info: DDP placement (None: one process).
        shared_evaluate: under DDP every rank calls ``evaluate`` (a collective: it embeds this rank's share
            and gathers the rest); False: rank 0 alone calls it.
        min_batch: a batch with fewer readable images is skipped (BatchNorm needs 2).
        data_key: identifies the training files (e.g. ``utils.cache.files_key``);
            a finished run is reused only for the same key.
    """

    def __init__(
        self,
        settings: LoopSettings,
        *,
        run_dir: Path,
        modules: dict[str, nn.Module],
        step_module: nn.Module,
        optimizer: torch.optim.Optimizer,
        device: torch.device,
        amp: torch.dtype | None,
        config: dict[str, Any],
        classes: list[str],
        resume_keys: Sequence[str] = (),
        evaluate: Callable[[], float] | None = None,
        dist_info: DistInfo | None = None,
        shared_evaluate: bool = False,
        min_batch: int = 1,
        data_key: str = "",
    ):
        settings.check()
        self.s, self.run_dir, self.modules = settings, Path(run_dir), modules
        self.step_module, self.optimizer, self.device, self.amp = step_module, optimizer, device, amp
        self.config, self.classes, self.resume_keys = config, classes, tuple(resume_keys)
        self.evaluate, self.dist, self.shared_evaluate = evaluate, dist_info or DistInfo(), shared_evaluate
        self.min_batch, self.data_key = min_batch, data_key
        self.base_lrs = [g["lr"] for g in optimizer.param_groups]
        self.scaler = torch.amp.GradScaler(device.type if device.type == "cuda" else "cpu", enabled=amp == torch.float16)
        self.state = LoopState()
        self.trained = False  # set once this run (or the one it resumed) has a checkpoint
        if self.dist.master:
            acquire_run_lock(self.run_dir)  # one writer per run folder; released when the run is written or at exit
        for stale in remove_stale_temps(self.run_dir) if self.dist.master else []:
            log.info("removed %s, left by a killed checkpoint write", stale.name)
        if settings.resume and not (self.run_dir / "last.pt").is_file():
            # interrupted before the first epoch was saved: the printed --resume command still works
            log.warning("%s: no last.pt to resume from (none was saved yet); training starts from the beginning", self.run_dir)
        if settings.resume and (self.run_dir / "last.pt").is_file():
            self._resume()
        elif (done := None if settings.retrain else self._finished_run()) is not None:
            self._reuse(done)
        elif self.dist.master:
            (self.run_dir / "best.pt").unlink(missing_ok=True)  # an earlier run's best never stands for this one

    # -- checkpoints -----------------------------------------------------------------------------
    def _snapshot(self, finished: bool) -> dict[str, Any]:
        """The full state; ``finished`` marks the last epoch of a run that was not killed (only such a run is reused)."""
        st = self.state
        return dict(
            **{k: m.state_dict() for k, m in self.modules.items()},
            optimizer=self.optimizer.state_dict(), scaler=self.scaler.state_dict(), precision=PRECISION_NAMES[self.amp],
            epoch=st.epoch - 1, step=st.step, best_score=st.best_score, bad_evals=st.bad_evals,
            history=st.history, config=self.config, classes=self.classes, data_key=self.data_key, finished=finished,
        )

    def _resume(self) -> None:
        path = self.run_dir / "last.pt"
        ckpt = load_checkpoint(path, self.device)
        diff = [k for k in self.resume_keys if ckpt.get("config", {}).get(k) != self.config.get(k)]
        if diff or ckpt.get("classes") != self.classes:
            what = ", ".join(f"--{k.replace('_', '-')}" for k in diff) or "the training identities"
            raise KitError(f"{path}: made with other {what}; use the same flags or drop --resume")
        missing = [k for k in (*self.modules, "optimizer", "scaler", "history") if k not in ckpt]
        if missing:
            raise KitError(f"{path}: lacks {missing} (written by an older kit); drop --resume to start again")
        for key, module in self.modules.items():
            module.load_state_dict(ckpt[key])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self._load_scaler(ckpt, path)
        self.state = LoopState(ckpt["epoch"] + 1, ckpt["step"], ckpt["best_score"], ckpt["bad_evals"], list(ckpt["history"]))
        self.trained = True
        log.info("resumed from %s after epoch %d", path, ckpt["epoch"] + 1)

    def _load_scaler(self, ckpt: dict[str, Any], path: Path) -> None:
        """The loss scale of ``last.pt``; a checkpoint from another precision (bf16, fp32: no scale) gives an fp16
        run a fresh scaler, and an fp16 checkpoint's scale is dropped by a run that needs none."""
        saved = ckpt["scaler"] or {}
        if self.scaler.is_enabled() and saved:
            self.scaler.load_state_dict(saved)
        elif self.scaler.is_enabled() or saved:
            log.info("%s: written in %s, resumed in %s: the loss scale starts afresh", path,
                     ckpt.get("precision", "fp16" if saved else "bf16/fp32"), PRECISION_NAMES[self.amp])

    def _finished_run(self) -> dict[str, Any] | None:
        """``last.pt`` when it holds a finished run of this config on these training files, else None."""
        path = self.run_dir / "last.pt"
        if not path.is_file() or not self.data_key:
            return None
        try:
            ckpt = load_checkpoint(path, "cpu")
        except KitError:
            return None
        same = lambda cfg: {k: v for k, v in cfg.items() if k not in VOLATILE_KEYS}  # noqa: E731
        ok = (ckpt.get("finished") and ckpt.get("data_key") == self.data_key and ckpt.get("classes") == self.classes
              and same(ckpt.get("config", {})) == same(self.config) and all(k in ckpt for k in self.modules))
        return ckpt if ok else None

    def _reuse(self, ckpt: dict[str, Any]) -> None:
        self.state = LoopState(ckpt["epoch"] + 1, ckpt["step"], ckpt["best_score"], ckpt["bad_evals"], list(ckpt["history"]))
        self.state.epoch = self.s.epochs  # finished: fit() has nothing left to do
        self.trained = True
        log.info("training: %s holds a finished run with these settings and training images; reusing it (--retrain to train again)",
                 self.run_dir / "last.pt")

    def final_checkpoint(self) -> Path | None:
        """The checkpoint to embed with: best.pt if this run scored validation (not --full-train), else last.pt.

        Under DDP rank 0 decides (it alone tracks validation and writes the checkpoints) and every rank gets
        its answer: a collective, called by every rank once ``fit`` has returned (the file is then written).
        """
        return broadcast(self.dist, self._final_checkpoint())

    def _final_checkpoint(self) -> Path | None:
        if not self.trained:
            return None
        best = self.run_dir / "best.pt"
        if not self.s.full_train and self.state.best_score > -1 and best.is_file():
            return best
        return self.run_dir / "last.pt"

    def sync_buffers(self) -> None:
        """Under DDP, rank 0's buffers (BatchNorm statistics) on every rank. DDP hands rank 0's to all before each
        forward and each rank's own batch then moves them, so until this the ranks differ by their last step."""
        if not self.dist.ddp:
            return
        for module in self.modules.values():
            for buf in module.buffers():
                dist.broadcast(buf.data, src=0)

    def restore(self, path: Path) -> dict[str, Any]:
        """Load ``path``'s module states into the modules; returns the checkpoint."""
        ckpt = load_checkpoint(path, self.device)
        for key, module in self.modules.items():
            module.load_state_dict(ckpt[key])
        return ckpt

    # -- the loop --------------------------------------------------------------------------------
    def _train_step(self, x: torch.Tensor, y: torch.Tensor, trainable: list[nn.Parameter]) -> torch.Tensor:
        """One optimiser step; returns the loss detached, on the device (no host sync here)."""
        step, total = self.state.step, self.total_steps
        for g, base in zip(self.optimizer.param_groups, self.base_lrs):
            g["lr"] = base * warmup_cosine(step, total, self.warmup_steps)
        try:
            with torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None):
                loss = self.step_module(x, y)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
        except RuntimeError as err:
            if NONDETERMINISTIC in str(err):  # --deterministic met an op without a deterministic kernel
                op = str(err).split(NONDETERMINISTIC)[0].strip()
                raise KitError(f"--deterministic: {op} has no deterministic kernel on {self.device.type}; drop --deterministic "
                               "(runs then agree to float rounding, docs/gpu.md)") from None
            raise
        if self.s.grad_clip:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(trainable, self.s.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.state.step += 1
        return loss.detach()

    def _to_device(self, x: torch.Tensor, y: torch.Tensor, ok: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The readable rows of a (pinned) batch on the device: copied whole, then selected there, so the
        host copy stays pinned and the transfer asynchronous (boolean indexing would make an unpinned copy)."""
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        if bool(ok.all()):
            return x, y
        idx = ok.nonzero().squeeze(1).to(self.device, non_blocking=True)
        return x.index_select(0, idx), y.index_select(0, idx)

    @staticmethod
    def _check_losses(pending: list[tuple[int, torch.Tensor]]) -> list[float]:
        """The pending steps' losses on the host (one sync); a non-finite one stops with one line naming its step."""
        if not pending:
            return []
        values = torch.stack([torch.as_tensor(v, dtype=torch.float32).reshape(()) for _, v in pending]).cpu().tolist()
        for (step, _), value in zip(pending, values):
            if not np.isfinite(value):
                raise KitError(f"loss is {value} at step {step}; lower --lr or the loss scale, or use --no-amp")
        pending.clear()
        return values

    def _epoch(self, loader: Iterable, epoch: int, trainable: list[nn.Parameter], skipped: set[str]) -> float:
        """One epoch; returns its mean loss over every rank (NaN when no step ran)."""
        losses: list[float] = []
        pending: list[tuple[int, torch.Tensor]] = []  # losses not yet read back: one host sync per LOG_EVERY steps
        n = min(self.steps_per_epoch, self.total_steps - self.state.step)
        bar = ProgressBar(f"epoch {epoch + 1}/{self.s.epochs}", n) if self.dist.master else QuietBar()
        with bar:
            for x, y, ok, err in loader:
                if self.state.step >= self.total_steps:
                    break
                log_unreadable(ok, err, skipped)
                if int(ok.sum()) < self.min_batch and not self.dist.ddp:  # under DDP every rank must step
                    continue
                pending.append((self.state.step, self._train_step(*self._to_device(x, y, ok), trainable)))
                bar.advance()
                if len(pending) >= LOG_EVERY:
                    losses += self._check_losses(pending)
                    bar.advance(0, info=f"loss {np.mean(losses[-LOG_EVERY:]):.3f}")
            losses += self._check_losses(pending)
        return self._global_mean(losses)

    def _global_mean(self, losses: list[float]) -> float:
        """The mean loss of this epoch over every rank's steps (under DDP: all_reduce of sum and count)."""
        total = torch.tensor([float(np.sum(losses)), float(len(losses))], dtype=torch.float64)
        if self.dist.ddp:
            total = total.to(self.device)
            dist.all_reduce(total)
            total = total.cpu()
        return float(total[0] / total[1]) if total[1] > 0 else float("nan")

    def _validate(self, epoch: int) -> float | None:
        """This epoch's validation score when one is due (on rank 0; on every rank with ``shared_evaluate``), else None."""
        s = self.s
        due = self.evaluate is not None and s.eval_every and ((epoch + 1) % s.eval_every == 0 or epoch + 1 == s.epochs)
        if not due or not (self.dist.master or self.shared_evaluate):
            return None
        if self.shared_evaluate:
            self.sync_buffers()  # every rank's share embedded by one model: rank 0's, the one best.pt holds
        return float(self.evaluate())

    def _after_epoch(self, epoch: int, loss: float, score: float | None) -> bool:
        """Rank 0: record the validation ``score``, checkpoints, early stopping. Returns whether to stop."""
        st, s = self.state, self.s
        record: dict[str, float] = {"epoch": epoch + 1, "loss": loss}
        if score is not None:
            record["val_score"] = score
        st.history.append(record)
        log.info("epoch %d: %s", epoch + 1, ", ".join(f"{k} {v:.4g}" for k, v in record.items() if k != "epoch"))
        improved = record.get("val_score", -1.0) > st.best_score
        if "val_score" in record:
            st.best_score, st.bad_evals = (record["val_score"], 0) if improved else (st.best_score, st.bad_evals + 1)
        st.epoch = epoch + 1
        stop = bool(s.patience and st.bad_evals >= s.patience and not s.full_train)
        if stop:
            log.info("no better validation score for %d evaluations: stopping early", st.bad_evals)
        snapshot = self._snapshot(finished=stop or st.epoch >= s.epochs or st.step >= self.total_steps)
        if improved:  # best.pt first: a crash in between never leaves last.pt claiming a better best.pt
            save_checkpoint(self.run_dir / "best.pt", **snapshot)
        save_checkpoint(self.run_dir / "last.pt", **snapshot)
        self.trained = True
        return stop

    def fit(self, loader: Iterable, on_epoch: Callable[[int], None] | None = None) -> LoopState:
        """Train from the current state to ``epochs`` (or ``max_steps``), one epoch at a time.

        Args:
            loader: yields ``(x, y, ok, error)`` batches (:class:`utils.data.image_dataset.ImageDataset`).
            on_epoch: called with the epoch number after the modules are put in train mode
                (set the sampler's and dataset's epoch, re-freeze BatchNorm, reseed shuffling).
        """
        s = self.s
        self.steps_per_epoch = len(loader)  # type: ignore[arg-type]
        self.total_steps = s.epochs * self.steps_per_epoch
        if s.max_steps:
            self.total_steps = min(self.total_steps, s.max_steps)
        self.warmup_steps = max(1, int(s.warmup_epochs * self.steps_per_epoch))
        base = getattr(self.step_module, "module", self.step_module)  # DDP wraps the module
        trainable = [p for p in base.parameters() if p.requires_grad]
        self.state.step = max(self.state.step, self.state.epoch * self.steps_per_epoch)
        skipped: set[str] = set()
        for epoch in range(self.state.epoch, s.epochs):
            if self.state.step >= self.total_steps:
                break
            self.step_module.train()
            if on_epoch is not None:
                on_epoch(epoch)
            loss = self._epoch(loader, epoch, trainable, skipped)
            score = self._validate(epoch)
            stop = self._after_epoch(epoch, loss, score) if self.dist.master else False
            if broadcast(self.dist, stop):
                break
        return self.state
