"""Run under torchrun: embed a folder of images sharded across ranks; rank 0 saves the gathered matrix.

    torchrun --nproc_per_node=2 tests/helpers/sharded_embed.py IMAGES_DIR OUT.npy
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from utils.data.augment import eval_transform  # noqa: E402
from utils.distributed import cleanup, init_distributed  # noqa: E402
from utils.embedding.embed import embed_images  # noqa: E402
from utils.embedding.views import tta_views  # noqa: E402

if __name__ == "__main__":
    info, device = init_distributed("cpu")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()).eval()
    paths = sorted(Path(sys.argv[1]).glob("*.png"))
    emb = embed_images(model, paths, eval_transform(24), device=device, views=tta_views(["flip"]), batch_size=3,
                       workers=0, dist_info=info)
    if info.master:
        import numpy as np

        np.save(sys.argv[2], emb)
    cleanup(info)
