"""Optional heavy packages: a ``has_<package>`` flag each, and one-line errors that say the fix.

The kit's core needs torch, timm, open_clip and the rest of requirements.txt.
Some model paths need more (facenet-pytorch, dlib); a machine set up by hand
may lack them. Scripts call :func:`require` before any long work, so a missing
package gives ``error: ...`` with the install command, not an ImportError
traceback halfway through a run.

    >>> require("dlib", "--embedder dlib")  # raises KitError if dlib is missing
"""

from __future__ import annotations

import importlib.util

from utils.errors import KitError

# import name -> the command that installs it (as scripts/setup.sh does)
INSTALL = {
    "facenet_pytorch": "pip install --no-deps facenet-pytorch==2.6.0",
    "dlib": "pip install dlib-bin==20.0.1.post1 face-recognition-models==0.3.0",
    "face_recognition_models": "pip install face-recognition-models==0.3.0",
    "faiss": "pip install faiss-cpu (or faiss-gpu on a CUDA box)",
    "transformers": "pip install transformers",
    "open_clip": "pip install open_clip_torch==3.3.0",
    "timm": "pip install timm==1.0.31",
}


def has(module: str) -> bool:
    """Whether ``module`` can be imported (without importing it)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


has_facenet_pytorch = has("facenet_pytorch")
has_dlib = has("dlib")
has_faiss = has("faiss")
has_transformers = has("transformers")


def require(module: str, needed_for: str) -> None:
    """Raise a one-line KitError naming the install command when ``module`` is missing.

    Raises:
        KitError: ``module`` cannot be imported.
    """
    if not has(module):
        how = INSTALL.get(module, f"pip install {module}")
        raise KitError(f"{needed_for} needs the Python package {module!r}, which is not installed; run: {how}")
