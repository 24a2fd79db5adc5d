"""Stage 0 of the *offline default* recipe: pretrain a small vision encoder on ShapesWorld, then freeze it.

Not part of the SparseCut method: the paper starts from a pretrained CLIP ViT-L/14-336, which cannot be
downloaded here, so the default model first learns to see ShapesWorld. The encoder is trained on exactly the
views SparseCut feeds it (the low-res image and the grid x grid high-res crops), with linear heads reading
the patch token under each object's centre (shape, colour, size, pattern, character) and an occupancy head on
every patch. Fine details are only legible in the crops, so that is where the encoder learns them.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoModel, SiglipVisionConfig, get_cosine_schedule_with_warmup

from ..data.shapesworld import CHARS, COLOURS, PATTERNS, SHAPES, SIZE_RADIUS, SIZES, render, sample_scene
from ..vision import HALF, make_views

ATTRIBUTES = {"shape": SHAPES, "colour": COLOURS, "size": SIZES, "pattern": PATTERNS, "char": ("none", *CHARS)}


@dataclass
class VisionPretrainConfig:
    """Stage 0 settings (the `vision_pretraining` block of a training yaml)."""

    steps: int = 1500
    """Optimizer steps."""
    batch_size: int = 32
    """Scenes per step (each gives 1 + grid**2 views)."""
    learning_rate: float = 1e-3
    """Peak AdamW learning rate (cosine decay)."""
    high_res_grid: int = 2
    """Must match the SparseCut model's grid: the crops the encoder learns on are the ones it will see."""
    seed: int = 0
    """Seed of the scene stream and the weights (scenes use the 'pretrain' split, disjoint from train/test)."""
    encoder: dict | None = None
    """SiglipVisionConfig arguments (default: 4 layers, hidden 128, 64 px input, 8 px patches)."""
    num_workers: int = 0
    """Processes rendering scenes (rendering, ~10 ms a scene, bounds a GPU run). 0: in the training process.
    Each worker draws its own seeded scene stream, so a run is reproducible for a given number of workers."""
    device: str = "auto"
    """"auto" (CUDA if available, with bf16 autocast), "cuda" or "cpu"."""


DEFAULT_ENCODER = dict(
    hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4, image_size=64, patch_size=8
)


def view_targets(scene, side: int, grid: int) -> list[list[tuple[int, object]]]:
    """For each view (low-res, then crops row-major), the (patch index, object) pairs of objects whose centre
    falls in that view."""
    per_view: list[list[tuple[int, object]]] = [[] for _ in range(1 + grid * grid)]
    for obj in scene.objects:
        per_view[0].append((int(obj.y * side) * side + int(obj.x * side), obj))
        gy, gx = obj.y * grid, obj.x * grid
        cy, cx = min(int(gy), grid - 1), min(int(gx), grid - 1)
        row, col = min(int((gy - cy) * side), side - 1), min(int((gx - cx) * side), side - 1)
        per_view[1 + cy * grid + cx].append((row * side + col, obj))
    return per_view


def occupancy(scene, side: int, grid: int) -> np.ndarray:
    """(1 + grid**2, side*side) 0/1: whether each patch centre lies within an object's radius."""
    centres = (np.arange(side) + 0.5) / side
    maps = []
    for view in range(1 + grid * grid):
        if view == 0:
            ys, xs = centres, centres
        else:
            cy, cx = divmod(view - 1, grid)
            ys, xs = (cy + centres) / grid, (cx + centres) / grid
        yy, xx = np.meshgrid(ys, xs, indexing="ij")
        inside = np.zeros((side, side), dtype=bool)
        for obj in scene.objects:
            inside |= (yy - obj.y) ** 2 + (xx - obj.x) ** 2 <= SIZE_RADIUS[obj.size] ** 2
        maps.append(inside.reshape(-1))
    return np.stack(maps).astype(np.float32)


class PretrainHeads(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.attributes = nn.ModuleDict({name: nn.Linear(hidden, len(values)) for name, values in ATTRIBUTES.items()})
        self.occupancy = nn.Linear(hidden, 1)


def sample_scene_with_character(rng: random.Random):
    """A ShapesWorld scene with at least one printed character. Only about one object in nine carries one, too
    few for 36 classes to be learned from plain scenes, so stage 0 draws scenes until one has a character."""
    while True:
        scene = sample_scene(rng)
        if any(obj.char for obj in scene.objects):
            return scene


def make_batch(rng: random.Random, batch_size: int, size: int, grid: int, side: int):
    views, occupied, picks = [], [], []  # picks: (row in the view batch, patch, attribute labels)
    for index in range(batch_size):
        scene = sample_scene_with_character(rng)
        image = render(scene, size * grid)
        views.append(make_views(image, size, grid, HALF, HALF))
        occupied.append(occupancy(scene, side, grid))
        for view, targets in enumerate(view_targets(scene, side, grid)):
            for patch, obj in targets:
                labels = {name: ATTRIBUTES[name].index(getattr(obj, name) or "none") for name in ATTRIBUTES}
                picks.append((index * (1 + grid * grid) + view, patch, labels, view > 0))
    pixel_values = torch.from_numpy(np.concatenate(views))  # (B * V, 3, S, S)
    return pixel_values, torch.from_numpy(np.concatenate(occupied)), picks


class SceneBatches(torch.utils.data.IterableDataset):
    """An endless stream of `make_batch` batches; each DataLoader worker renders its own seeded stream."""

    def __init__(self, seed: int, batch_size: int, size: int, grid: int, side: int):
        self.seed, self.args = seed, (batch_size, size, grid, side)

    def __iter__(self):
        worker = torch.utils.data.get_worker_info()
        rng = random.Random(f"pretrain-{self.seed}" if worker is None else f"pretrain-{self.seed}-{worker.id}")
        while True:
            pixel_values, occupied, picks = make_batch(rng, *self.args)
            yield (
                pixel_values,
                occupied,
                torch.tensor([[row, patch, int(crop)] for row, patch, _, crop in picks]),
                {name: torch.tensor([labels[name] for _, _, labels, _ in picks]) for name in ATTRIBUTES},
            )


def pretrain_vision(config: VisionPretrainConfig, out_dir: str | Path) -> Path:
    """Train the encoder and save it (transformers format) to out_dir; returns out_dir."""
    out = Path(out_dir)
    torch.manual_seed(config.seed)
    encoder_config = SiglipVisionConfig(**{**DEFAULT_ENCODER, **(config.encoder or {})}, vision_use_head=False)
    encoder = AutoModel.from_config(encoder_config)
    heads = PretrainHeads(encoder_config.hidden_size)
    parameters = [*encoder.parameters(), *heads.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=config.learning_rate, weight_decay=0.01)
    schedule = get_cosine_schedule_with_warmup(optimizer, max(1, config.steps // 20), config.steps)
    size, grid = encoder_config.image_size, config.high_res_grid
    side = size // encoder_config.patch_size
    auto = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(auto if config.device == "auto" else config.device)
    encoder.to(device)
    heads.to(device)
    batches = torch.utils.data.DataLoader(
        SceneBatches(config.seed, config.batch_size, size, grid, side),
        batch_size=None,
        num_workers=config.num_workers,
        prefetch_factor=4 if config.num_workers else None,
    )
    progress = tqdm(zip(range(config.steps), batches), total=config.steps, desc="stage 0: vision encoder")
    log, started = [], time.perf_counter()
    for step, (pixel_values, occupied, picks, labels) in progress:
        pixel_values, occupied, picks = pixel_values.to(device), occupied.to(device), picks.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            tokens = encoder(pixel_values=pixel_values).last_hidden_state  # (B*V, side*side, d)
        tokens = tokens.float()
        loss = F.binary_cross_entropy_with_logits(heads.occupancy(tokens).squeeze(-1), occupied)
        picked = tokens[picks[:, 0], picks[:, 1]]  # (objects, d)
        in_crop = picks[:, 2].bool()
        accuracy = {}
        for name, head in heads.attributes.items():
            target = labels[name].to(device)
            logits = head(picked)
            loss = loss + F.cross_entropy(logits, target)
            correct = (logits.argmax(-1) == target).float()
            if name == "char":
                # The identity of a character, where one is legible: a loss of its own, not drowned by the
                # objects without one (the "none" class alone scores 0.89).
                glyphs = in_crop & (target != 0)
                loss = loss + F.cross_entropy(logits[glyphs], target[glyphs])
                accuracy["crop_glyph"] = float(correct[glyphs].mean())
            # Fine detail is only legible in the crops, so the two scales are reported apart.
            accuracy[f"crop_{name}"] = float(correct[in_crop].mean())
            accuracy[f"low_{name}"] = float(correct[~in_crop].mean())
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        schedule.step()
        log.append({"step": step + 1, "loss": loss.item(), **accuracy})
        progress.set_postfix(
            loss=f"{loss.item():.3f}",
            crop_pattern=f"{accuracy['crop_pattern']:.2f}",
            crop_glyph=f"{accuracy['crop_glyph']:.2f}",
        )
    encoder.cpu().save_pretrained(out)
    (out / "pretrain_log.json").write_text(
        json.dumps({"seconds": time.perf_counter() - started, "config": config.__dict__, "log": log[-50:]}, indent=1)
    )
    return out
