"""Weights apart from training: resolve ``--weights``, load state dicts, fetch the defaults into a folder.

    python -m utils.weights fetch            # every default weight file into weights/ (or $KIT_WEIGHTS_DIR)
    python -m utils.weights list             # which defaults are present

Modules: :mod:`.state` (read, clean and load state dicts; :func:`fingerprint`),
:mod:`.catalog` (what can be fetched; the defaults), :mod:`.store` (the folder
and its manifest), :mod:`.download` (HTTP download with resume and sha256),
:mod:`.resolve` (a ``--weights`` value -> where its tensors come from),
:mod:`.report` (the preflight check and the ``list`` table).
"""

from utils.weights.resolve import Resolved, is_weights_file, resolve_hf_source, resolve_weights
from utils.weights.state import LoadReport, fingerprint, load_into, load_weights_file
from utils.weights.store import weights_dir

__all__ = [
    "LoadReport", "Resolved", "fingerprint", "is_weights_file", "load_into", "load_weights_file",
    "resolve_hf_source", "resolve_weights", "weights_dir",
]
