"""Images that became unreadable after the split are skipped and counted in every reader, not only
in the training loaders: export's calibration/guard/eval sets and pruning's sample images too."""
import numpy as np
import torch

from rsedge.trainer.datasets import ImageListDataset
from rsedge.trainer.tasks.base import stack_dataset


def _folder(tmp_path, n=4):
    from PIL import Image

    d = tmp_path / "a"
    d.mkdir()
    for i in range(n):
        Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(d / f"{i}.png")
    return [(f"a/{i}.png", 0) for i in range(n)]


def _to_tensor(img):
    return torch.from_numpy(np.asarray(img, np.float32).transpose(2, 0, 1) / 255)


def test_stack_dataset_skips_and_counts_a_late_unreadable_image(tmp_path):
    items = _folder(tmp_path)
    (tmp_path / "a" / "2.png").write_bytes(b"not a png any more")
    said = []
    images, targets = stack_dataset(ImageListDataset(tmp_path, items, _to_tensor), (8, 8), log=said.append)
    assert images.shape == (3, 3, 8, 8) and targets == [0, 0, 0]
    assert len(said) == 1 and "1 image(s) unreadable" in said[0] and "2.png" in said[0]
    assert np.allclose(images[:, 0, 0, 0], [0, 40 / 255, 120 / 255])


def test_prune_sample_tensors_skip_a_late_unreadable_image(tmp_path, capsys):
    from rsedge.compress.prune import _Data

    items = _folder(tmp_path)
    (tmp_path / "a" / "1.png").write_bytes(b"")
    data = _Data.__new__(_Data)
    data.seed = 0
    x, y = data.tensors(ImageListDataset(tmp_path, items, _to_tensor), 4)
    assert x.shape == (3, 3, 8, 8) and y.tolist() == [0, 0, 0]
    assert "1 image(s) unreadable" in capsys.readouterr().out
