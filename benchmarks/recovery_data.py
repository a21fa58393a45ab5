"""The subjects of ``benchmarks/recovery.py``: trained networks, their calibration batches, a held-out
evaluation set and an unlabelled training stream, all offline.

- ``digits-r20``: ``cifar_resnet20`` trained by this package on scikit-learn's digits at 16x16 for
  40 epochs (``TRAIN_DIGITS`` is the command; ``ensure_digits_checkpoint`` runs it when the
  checkpoint is missing). Calibration: 512 train-split images (fixed permutation, no
  augmentation). Held-out: the 360 validation images and "val+shifts" (the same images plus 8
  copies shifted by up to 2 px: 3,240 inputs, so that accuracies do not saturate at 360 images).
  Distillation stream: train-split images shifted by up to 2 px (the recipe's augmentation),
  batches of 64, labels never used.
- ``mtcnn-pnet`` / ``mtcnn-rnet`` / ``mtcnn-onet``: the trained MTCNN networks shipped with
  ``facenet-pytorch`` (``pip install --no-deps facenet-pytorch``; the ``mtcnn`` extra), at their
  own input sizes 12/24/48. No face data set is available offline, so windows are cut from every
  photo bundled with scikit-image and scikit-learn: the windows the *original* cascade feeds each
  net (``detect_face`` with relaxed thresholds, recorded), random windows, and windows jittered
  around the cascade's final boxes, preprocessed as MTCNN does (area resampling, ``(x - 127.5) /
  128``). Calibration windows come from the horizontally flipped photos, held-out windows from the
  unflipped ones; negatives are subsampled so that positives (the original's decision at the
  stage threshold 0.6 / 0.7 / 0.7) are 8-33%. The stream draws calibration windows with random
  flips. Their "labels" are the original's own decisions: what is measured is fidelity.
"""

from __future__ import annotations

import math
import random
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
DIGITS_RUN = REPO / "runs" / "digits-r20"
#: How the digits subject was trained (40 epochs of the bundled digits-demo recipe, ~75 s on 2 CPU cores).
TRAIN_DIGITS = [sys.executable, "-m", "bsconv_surgery", "train", "digits-demo", "--model", "cifar_resnet20",
                "--set", "epochs=40", "--set", "seed=0", "--set", "data.workers=0", "--out", str(DIGITS_RUN)]
MTCNN_SIZES = {"pnet": 12, "rnet": 24, "onet": 48}
MTCNN_THRESHOLDS = {"pnet": 0.6, "rnet": 0.7, "onet": 0.7}  # facenet-pytorch's per-stage defaults


class Subject:
    """A trained model with its data. ``calib``: list of input batches; ``eval_x`` / ``eval_y``:
    held-out inputs (labels or None); ``extra``: named extra evaluation sets."""

    def __init__(self, name: str, model: torch.nn.Module, input_size, calib: List[torch.Tensor], eval_x: torch.Tensor,
                 eval_y: Optional[torch.Tensor], stream, first: str, threshold: Optional[float] = None,
                 extra: Optional[Dict[str, Tuple[torch.Tensor, Optional[torch.Tensor]]]] = None, note: str = "",
                 pool: Optional[torch.Tensor] = None):
        self.name, self.model, self.input_size = name, model.eval(), tuple(input_size)
        self.calib, self.eval_x, self.eval_y = calib, eval_x, eval_y
        self.stream, self.first, self.threshold = stream, first, threshold
        self.extra = extra or {}
        self.note = note
        self.pool = pool  # every training input, unaugmented (what ``compress`` is given): never the held-out

    @property
    def classifier(self) -> bool:
        return self.threshold is None


# -- digits ---------------------------------------------------------------------------------------

def ensure_digits_checkpoint(path: Optional[Path]) -> Path:
    path = Path(path) if path else DIGITS_RUN / "last.pt"
    if not path.is_file():
        print(f"training the digits subject: {' '.join(TRAIN_DIGITS[1:])}", flush=True)
        subprocess.run(TRAIN_DIGITS, check=True, cwd=REPO)
        path = DIGITS_RUN / "last.pt"
    return path


def _shift(images: torch.Tensor, dx: torch.Tensor, dy: torch.Tensor, pad: int = 2) -> torch.Tensor:
    x = F.pad(images, (pad,) * 4)
    size = images.shape[-1]
    return torch.stack([x[i, :, dy[i]:dy[i] + size, dx[i]:dx[i] + size] for i in range(len(images))])


def digits_subject(checkpoint: Optional[Path] = None) -> Subject:
    from bsconv_surgery.data.datasets import build_datasets
    from bsconv_surgery.models import create_model, parse_model_spec

    checkpoint = ensure_digits_checkpoint(checkpoint)
    ds = build_datasets("digits", 16)
    raw_train, raw_val = ds.train.images, ds.val.images
    mean, std = raw_train.mean().item(), raw_train.std().item()
    norm = lambda x: (x - mean) / std  # noqa: E731  (the training normalisation, as datasets.py)
    perm = torch.randperm(len(raw_train), generator=torch.Generator().manual_seed(0))
    calib_x = norm(raw_train[perm][:512])
    val_x, val_y = norm(raw_val), ds.val.labels.clone()
    gen = torch.Generator().manual_seed(1)
    shifted = [val_x]
    for _ in range(8):
        dx, dy = torch.randint(0, 5, (2, len(raw_val)), generator=gen)
        shifted.append(norm(_shift(raw_val, dx, dy)))
    extra = {"val+shifts": (torch.cat(shifted), val_y.repeat(9))}

    def stream(seed: int = 0, batch: int = 64):
        g = torch.Generator().manual_seed(seed)
        while True:
            idx = torch.randint(len(raw_train), (batch,), generator=g)
            dx, dy = torch.randint(0, 5, (2, batch), generator=g)
            yield norm(_shift(raw_train[idx], dx, dy))

    model = create_model(parse_model_spec("cifar_resnet20"), num_classes=10, checkpoint=checkpoint)
    return Subject("digits-r20", model, (3, 16, 16), list(calib_x.split(64)), val_x, val_y, stream, "stem.conv",
                   extra=extra, note=f"cifar_resnet20, digits 16x16, 40 epochs ({checkpoint})", pool=norm(raw_train[perm]))


# -- MTCNN ----------------------------------------------------------------------------------------

def _photos() -> Dict[str, np.ndarray]:
    import skimage.data as d
    from sklearn.datasets import load_sample_images

    names = ["astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field", "colorwheel",
             "camera", "grass", "gravel", "brick", "moon", "clock", "coins", "page", "text"]
    out = {}
    for name in names:
        im = getattr(d, name)()
        if im.ndim == 2:
            im = np.stack([im] * 3, -1)
        out[name] = np.ascontiguousarray(im[..., :3]).astype(np.uint8)
    for name, im in zip(["china", "flower"], load_sample_images().images):
        out[name] = im
    return out


class _Recorder(torch.nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net, self.inputs = net, []

    def forward(self, x):
        self.inputs.append(x.detach().clone())
        return self.net(x)


def _windows(img: np.ndarray, boxes, n: int, size: int, rng: random.Random, jitter: bool) -> torch.Tensor:
    from facenet_pytorch.models.utils.detect_face import imresample

    h, w = img.shape[:2]
    t = torch.as_tensor(np.ascontiguousarray(img)).permute(2, 0, 1)[None].float()
    out = []
    if not jitter:
        for _ in range(n):
            s = int(math.exp(rng.uniform(math.log(12), math.log(min(h, w)))))
            y, x = rng.randint(0, h - s), rng.randint(0, w - s)
            out.append(imresample(t[:, :, y:y + s, x:x + s], (size, size)))
    else:
        for b in boxes:
            x1, y1, x2, y2 = (float(v) for v in b[:4])
            cx, cy, side = (x1 + x2) / 2, (y1 + y2) / 2, max(x2 - x1, y2 - y1)
            for _ in range(n):
                s = max(12, int(side * math.exp(rng.uniform(math.log(0.8), math.log(1.25)))))
                x = int(cx - s / 2 + rng.uniform(-0.2, 0.2) * side)
                y = int(cy - s / 2 + rng.uniform(-0.2, 0.2) * side)
                x, y = min(max(x, 0), max(w - s, 0)), min(max(y, 0), max(h - s, 0))
                crop = t[:, :, y:y + s, x:x + s]
                if crop.shape[-1] >= 4 and crop.shape[-2] >= 4:
                    out.append(imresample(crop, (size, size)))
    return (torch.cat(out) - 127.5) * 0.0078125 if out else torch.zeros(0, 3, size, size)


def _mtcnn_split(split: str, nets) -> Dict[str, torch.Tensor]:
    from facenet_pytorch.models.utils.detect_face import detect_face

    rng = random.Random(0 if split == "calib" else 1)
    data: Dict[str, List[torch.Tensor]] = {k: [] for k in MTCNN_SIZES}
    for im in _photos().values():
        if split == "calib":
            im = np.ascontiguousarray(im[:, ::-1])
        rnet, onet = _Recorder(nets["rnet"]), _Recorder(nets["onet"])
        with torch.no_grad():
            boxes, _ = detect_face(im, 20, nets["pnet"], rnet, onet, [0.3, 0.3, 0.3], 0.709, "cpu")
        boxes = boxes[0]
        if rnet.inputs:
            data["rnet"].append(torch.cat(rnet.inputs))
            data["pnet"].append(F.interpolate(torch.cat(rnet.inputs), size=(12, 12), mode="area"))
        if onet.inputs:
            data["onet"].append(torch.cat(onet.inputs))
        for k, s in MTCNN_SIZES.items():
            data[k].append(_windows(im, None, 200, s, rng, jitter=False))
            if boxes is not None and len(boxes):
                data[k].append(_windows(im, boxes, 40, s, rng, jitter=True))
    return {k: torch.cat(v) for k, v in data.items()}


def mtcnn_windows(cache: Path) -> Dict[str, Dict[str, torch.Tensor]]:
    """``{net: {"calib": x, "eval": x}}``, built once (about a minute) and cached."""
    file = cache / "mtcnn_windows.pt"
    if file.is_file():
        return torch.load(file)
    from facenet_pytorch.models.mtcnn import ONet, PNet, RNet

    nets = {"pnet": PNet().eval(), "rnet": RNet().eval(), "onet": ONet().eval()}
    gen = torch.Generator().manual_seed(0)
    out: Dict[str, Dict[str, torch.Tensor]] = {k: {} for k in MTCNN_SIZES}
    for split, cap in (("calib", 3072), ("eval", 1536)):
        for k, x in _mtcnn_split(split, nets).items():
            with torch.no_grad():
                p = nets[k](x)[-1].reshape(len(x), 2, -1)[:, 1, 0]
            pos = p > MTCNN_THRESHOLDS[k]
            ip, ineg = pos.nonzero()[:, 0], (~pos).nonzero()[:, 0]
            ineg = ineg[torch.randperm(len(ineg), generator=gen)[:max(1536, 2 * len(ip))]]
            idx = torch.cat([ip, ineg])
            idx = idx[torch.randperm(len(idx), generator=gen)][:cap]
            out[k][split] = x[idx].contiguous()
    cache.mkdir(parents=True, exist_ok=True)
    torch.save(out, file)
    return out


def window_stream(windows: torch.Tensor, seed: int = 0, batch: int = 64):
    """Endless batches of ``windows`` drawn with replacement, each flipped horizontally with p = 0.5."""
    g = torch.Generator().manual_seed(seed)
    while True:
        x = windows[torch.randint(len(windows), (batch,), generator=g)]
        flip = torch.rand(batch, generator=g) < 0.5
        yield torch.where(flip[:, None, None, None], x.flip(-1), x)


def mtcnn_subject(which: str, cache: Path) -> Subject:
    from facenet_pytorch.models.mtcnn import ONet, PNet, RNet

    net = {"pnet": PNet, "rnet": RNet, "onet": ONet}[which](pretrained=True).eval()
    windows = mtcnn_windows(cache)[which]
    calib_x, eval_x = windows["calib"], windows["eval"]

    def stream(seed: int = 0, batch: int = 64):
        return window_stream(calib_x, seed, batch)

    size = MTCNN_SIZES[which]
    return Subject(f"mtcnn-{which}", net, (3, size, size), list(calib_x[:1024].split(64)), eval_x, None, stream,
                   "conv1", threshold=MTCNN_THRESHOLDS[which],
                   note=f"facenet-pytorch {which.upper()} (trained weights), {size}x{size} windows", pool=calib_x)
