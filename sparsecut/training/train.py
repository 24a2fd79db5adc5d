"""Two-stage training (LLaVA-1.5 protocol, method note "Parts" 5) with accelerate: `sparsecut train CONFIG.yaml`.

Stage 1 "alignment" trains the fusion/projector and the shortcut gates on captions with the encoder and the
LLM frozen; stage 2 "instruction tuning" also trains the LLM. The vision encoder is frozen throughout, as in
the paper. The same code runs on the CPU, one GPU, or many through `accelerate launch` (DDP / FSDP / DeepSpeed
from an accelerate config). Each stage saves a loadable checkpoint; `resume` restarts a stage from its last
saved step.

Config (yaml, first line the command that runs it):

    model: {vision: <path | hub id | {model_type: ..., **config}>, llm: <path | "smollm2-135m" | {...}>,
            config: {fusion: cross_attention, high_res_grid: 2, schedule: "uniform:4", ...}}
    output_dir: runs/name
    seed: 0
    stages:
      - {name: align, train: [fusion, gates], data: path/train.json, image_root: path, epochs: 1,
         batch_size: 16, learning_rate: 1.0e-3, ...}
      - {name: instruct, train: [fusion, gates, llm], ...}
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
import shutil
import time
import warnings
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.utils.data import DataLoader, Sampler
from tqdm.auto import tqdm
from transformers import AutoConfig, get_cosine_schedule_with_warmup

from ..adapters import LORA_DEFAULTS, inject_lora, save_without_base
from ..build import build, is_checkpoint, load_model
from ..data.collate import Collator, ConversationDataset
from ..data.llava_format import group_by_image, image_groups, load_llava_json
from ..data.shapesworld import generate_dataset
from ..inspection.charts import line_chart
from ..modeling import SparseCutForConditionalGeneration
from ..tokenization import byte_tokenizer
from .pretrain_vision import VisionPretrainConfig, pretrain_vision

TRAINABLE_PARTS = ("fusion", "gates", "lora", "llm", "vision")
MIXED_PRECISION = ("auto", "no", "bf16", "fp16")


@dataclass
class StageConfig:
    """One training stage."""

    name: str
    """Stage name; its checkpoint goes to `output_dir/name`."""
    data: str
    """LLaVA-format JSON of training conversations."""
    train: list[str] = field(default_factory=lambda: ["fusion", "gates"])
    """What trains: any of fusion, gates, lora (adapters on the LLM, added on first use), llm (all of it),
    vision (the paper keeps the encoder frozen)."""
    image_root: str | None = None
    """Directory the JSON's image paths are relative to (default: the JSON's directory)."""
    eval_data: str | None = None
    """Held-out JSON for periodic evaluation loss."""
    epochs: float = 1.0
    """Passes over the data (fractions allowed); `max_steps` overrides it."""
    max_steps: int | None = None
    """Optimizer steps to run, overriding `epochs`."""
    batch_size: int = 16
    """Per-device batch size."""
    gradient_accumulation: int = 1
    """Micro-batches per optimizer step."""
    learning_rate: float = 1e-3
    """Peak learning rate (cosine decay after warm-up)."""
    fusion_learning_rate: float | None = None
    """Peak learning rate of the fusion module and the shortcut gates, if it should differ from the LLM's
    (LoRA or full): new modules usually want a higher one. None: `learning_rate`."""
    families: list[str] | None = None
    """Train only on records whose `family` field is one of these (ShapesWorld writes one per record), and take
    the held-out loss on those families of `eval_data` only; None: all records."""
    family_weights: dict[str, float] | None = None
    """Sampling weight per question family in the training data: a record of a family with weight w appears
    int(w) times, plus once more with probability w - int(w) (seeded), so a hard family can count for more
    without training on it alone; unnamed families keep weight 1, 0 drops one. None: as recorded."""
    warmup_ratio: float = 0.03
    """Share of the steps spent warming the learning rate up."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    group_turns: int = 1
    """Merge up to this many training records about the same image into one multi-turn conversation
    (`llava_format.group_by_image`): the image tokens are then paid once per conversation. 1: as recorded."""
    independent_turns: bool = False
    """With `group_turns`: pack the grouped records into one sequence that holds the image once, each record
    seeing the image and the prompt prefix but not the others (`data.pack_shared_prefix`), instead of one
    multi-turn conversation in which later answers can be read off earlier ones."""
    max_length: int | None = None
    """Truncate conversations to this many tokens (never through an image)."""
    eval_samples: int | None = 256
    """Evaluate on the first this-many held-out conversations (None: all of them)."""
    eval_every: int = 0
    """Steps between evaluations (0: only at the end)."""
    save_every: int = 0
    """Steps between resumable checkpoints (0: only at the end)."""
    gradient_checkpointing: bool = False
    """Recompute LLM activations in backward to save memory."""
    num_workers: int = 0
    """DataLoader worker processes (they read and resize the images); 0: in the training process."""
    average_with_start: float = 0.0
    """At the end of the stage, move every parameter it trained this share of the way back to its value at the
    stage's start: 0 keeps the trained weights, 0.5 saves the mean of the model before and after the stage (a
    "model soup" of the two; LoRA's A and B matrices are averaged each on its own). Small CPU stages on the
    default model ended below where they started on the families they weighted most, and their mean with the
    start level with it or above (docs/training.md). The last log record then holds the held-out loss both
    ways (`eval_loss` as trained, `averaged_eval_loss` after the move)."""
    seed: int | None = None
    """Seed of this stage's data order, family-weight coin tosses and random state; None: the run's `seed`
    (stages that continue one another on the same data can then see it in different orders)."""

    def __post_init__(self):
        unknown = set(self.train) - set(TRAINABLE_PARTS)
        if unknown:
            raise ValueError(f"Stage {self.name!r}: unknown trainable parts {sorted(unknown)}; use {TRAINABLE_PARTS}.")
        negative = {family: w for family, w in (self.family_weights or {}).items() if not w >= 0}
        if negative:
            raise ValueError(f"Stage {self.name!r}: family weights must be >= 0, got {negative}.")
        if not 0 <= self.average_with_start <= 1:
            raise ValueError(
                f"Stage {self.name!r}: average_with_start is a share in [0, 1], got {self.average_with_start}."
            )


@dataclass
class TrainConfig:
    """A whole training run."""

    output_dir: str
    """Where stage checkpoints, logs and the loss curve go."""
    stages: list[StageConfig]
    """Stages, run in order; each starts from the previous stage's model."""
    model: dict = field(default_factory=dict)
    """`vision`, `llm` (as `sparsecut.build` takes them, or a dict config) and `config` overrides; or `init` with
    the path of a SparseCut checkpoint to start from (with `high_res_overlap: true` / `false` to change its
    high-res crops, `sparsecut.build.set_high_res_overlap`). A relative `vision` or `init` that starts with "." or names
    a folder next to the yaml (or the folder stage 0 writes) is read from the yaml's folder."""
    seed: int = 0
    """Seed of weights initialisation and data order (a stage's own `seed` overrides it for that stage)."""
    mixed_precision: str = "auto"
    """"bf16" (autocast; on the CPU only where it has bf16 instructions, else "no" with a warning:
    `mixed_precision_for`), "no", or "auto": bf16 on CUDA, else no."""
    save_base_llm: bool = True
    """False: checkpoints leave the LLM's base weights out and name `model.llm` as their source (needs an LLM
    given by name or path, trained through LoRA or not at all)."""
    lora: dict = field(default_factory=dict)
    """peft LoraConfig arguments for stages that train `lora` (defaults: sparsecut.adapters.LORA_DEFAULTS)."""
    shapesworld: dict | None = None
    """Generate ShapesWorld first if missing: {out_dir, train_images, test_images, image_size, seed,
    train_questions_per_image} (`prepare_shapesworld`); stage data paths may then point into out_dir."""
    vision_pretraining: dict | None = None
    """Stage 0 of the offline default (`VisionPretrainConfig` fields): train a small encoder on ShapesWorld and
    save it to `model.vision` (a path) before the SparseCut stages, unless it is already there."""

    def __post_init__(self):
        if not self.save_base_llm:
            if not isinstance(self.model.get("llm"), str):
                raise ValueError("save_base_llm: false needs model.llm given by name or path, to rebuild it from.")
            if any("llm" in stage.train for stage in self.stages):
                raise ValueError("save_base_llm: false cannot ship a fully trained LLM; train it through `lora`.")
        if "high_res_overlap" in self.model and "init" not in self.model:
            raise ValueError(
                "model.high_res_overlap switches the crops of a saved model (model.init); "
                "for a new model, set it in model.config."
            )
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"mixed_precision must be one of {MIXED_PRECISION}, got {self.mixed_precision!r}.")

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> TrainConfig:
        return cls.from_dict(yaml.safe_load(Path(path).read_text()), Path(path).resolve().parent)

    @classmethod
    def from_dict(cls, raw: dict, base: Path) -> TrainConfig:
        """A config from its yaml's contents; relative paths are taken from `base` (the yaml's directory)."""
        raw = copy.deepcopy(raw)
        if not os.path.isabs(raw["output_dir"]):
            raw["output_dir"] = str((base / raw["output_dir"]).resolve())
        if raw.get("shapesworld") and not os.path.isabs(raw["shapesworld"]["out_dir"]):
            raw["shapesworld"]["out_dir"] = str((base / raw["shapesworld"]["out_dir"]).resolve())
        # Model paths are taken from the yaml's directory when they start with "." (no hub id does), name a folder
        # there, or name the one stage 0 will write; anything else is left as given (a hub id, or a path from the
        # working directory). A missing "../runs/x" is then reported where it was looked for.
        model = raw.get("model", {})
        for key in ("vision", "init"):
            path = model.get(key)
            if not isinstance(path, str) or os.path.isabs(path):
                continue
            written_by_stage0 = key == "vision" and raw.get("vision_pretraining") is not None
            if written_by_stage0 or path.startswith(".") or (base / path).is_dir():
                model[key] = str((base / path).resolve())
        stages = []
        for stage in raw.pop("stages"):
            for key in ("data", "eval_data", "image_root"):
                if stage.get(key):
                    stage[key] = str((base / stage[key]).resolve()) if not os.path.isabs(stage[key]) else stage[key]
            stages.append(StageConfig(**stage))
        return cls(stages=stages, **raw)


def set_trainable(model: SparseCutForConditionalGeneration, parts: list[str]) -> int:
    """The one place that says what trains. Returns the number of trainable parameters."""
    modules = {
        "fusion": model.fusion,
        "gates": model.shortcuts,
        "llm": model.language_model,
        "vision": model.vision_tower,
    }
    model.requires_grad_(False)
    for part in parts:
        if part == "lora":
            if not model.config.lora:
                raise ValueError("Stage trains `lora` but the model has no LoRA adapters; see `add_lora`.")
            for name, parameter in model.language_model.named_parameters():
                parameter.requires_grad_("lora_" in name)
        else:
            modules[part].requires_grad_(True)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def parameter_groups(model: SparseCutForConditionalGeneration, stage: StageConfig) -> list[dict]:
    """The trainable parameters as optimizer groups: the new modules (fusion, gates) at `fusion_learning_rate`,
    the rest at `learning_rate`."""
    new = {id(p) for module in (model.fusion, model.shortcuts) for p in module.parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    fusion_lr = stage.fusion_learning_rate or stage.learning_rate
    groups = [
        {"params": [p for p in trainable if id(p) in new], "lr": fusion_lr},
        {"params": [p for p in trainable if id(p) not in new], "lr": stage.learning_rate},
    ]
    return [group for group in groups if group["params"]]


def add_lora(model: SparseCutForConditionalGeneration, lora: dict) -> None:
    """Give the LLM LoRA adapters (once); the config records them so that checkpoints reload with them."""
    if not model.config.lora:
        model.config.lora = {**LORA_DEFAULTS, **lora}
        inject_lora(model.language_model, model.config.lora)


def _backbone(spec):
    """A backbone spec from yaml: a dict is a transformers config, anything else goes to `build` as is."""
    if isinstance(spec, dict):
        spec = dict(spec)
        return AutoConfig.for_model(spec.pop("model_type"), **spec)
    return spec


def initial_model(config: TrainConfig):
    """The model the first stage starts from: a saved one (`init`), or one built from the configured backbones
    with the new modules (fusion, gates) initialised from `config.seed`."""
    spec = config.model
    set_seed(config.seed)
    if "init" in spec:
        return load_model(
            spec["init"], device="cpu", high_res_overlap=spec.get("high_res_overlap"), merge_adapters=False
        )
    # "byte" names the code-built byte tokenizer, for config-only LLMs (tests, toy runs).
    tokenizer = byte_tokenizer() if spec.get("tokenizer") == "byte" else None
    return build(
        vision=_backbone(spec["vision"]), llm=_backbone(spec["llm"]), tokenizer=tokenizer, **spec.get("config", {})
    )


def _loader(
    path: str, image_root: str | None, processor, stage: StageConfig, shuffle: bool, seed: int, limit: int | None = None
) -> DataLoader:
    samples = load_llava_json(path, image_root=image_root or str(Path(path).parent))
    if stage.families is not None:  # the training data and the held-out loss alike
        samples = [sample for sample in samples if sample.meta.get("family") in stage.families]
        if not samples:
            raise ValueError(f"Stage {stage.name!r}: no record of {path} has a family in {stage.families}.")
    if shuffle and stage.family_weights:
        samples = reweight_families(samples, stage.family_weights, seed)
        if not samples:
            raise ValueError(f"Stage {stage.name!r}: family_weights {stage.family_weights} leave no record of {path}.")
    samples = samples[:limit]
    if shuffle and stage.independent_turns:  # training data
        dataset = ConversationDataset.packed(image_groups(samples, stage.group_turns), processor, stage.max_length)
    else:
        if shuffle:
            samples = group_by_image(samples, stage.group_turns)
        dataset = ConversationDataset(samples, processor, stage.max_length)
    common = {"collate_fn": Collator(processor), "num_workers": stage.num_workers}
    if shuffle:
        lengths = [len(item.input_ids) for item in dataset.items]
        return DataLoader(dataset, batch_sampler=LengthGroupedBatches(lengths, stage.batch_size, seed), **common)
    return DataLoader(dataset, batch_size=stage.batch_size, **common)


def reweight_families(samples: list, weights: dict[str, float], seed: int) -> list:
    """Each record repeated by its family's weight (`StageConfig.family_weights`), in place, so that an image's
    records stay together; a fractional part is a seeded coin toss per record."""
    rng = random.Random(f"family-weights-{seed}")
    out = []
    for sample in samples:
        weight = weights.get(sample.meta.get("family"), 1.0)
        out += [sample] * (int(weight) + (rng.random() < weight - int(weight)))
    return out


class LengthGroupedBatches(Sampler):
    """Shuffled batches of similar lengths, so that little of a batch is padding: the data is shuffled, cut
    into windows of 64 batches, each window sorted by length and cut into batches, and the batches shuffled.
    The order is a function of the seed alone (the first pass is the same after a resume)."""

    def __init__(self, lengths: list[int], batch_size: int, seed: int, window: int = 64):
        self.lengths, self.batch_size, self.seed, self.window = lengths, batch_size, seed, window
        self.passes = 0

    def __len__(self) -> int:
        return math.ceil(len(self.lengths) / self.batch_size)

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.passes)
        self.passes += 1
        order = torch.randperm(len(self.lengths), generator=generator).tolist()
        span = self.window * self.batch_size
        batches = []
        for start in range(0, len(order), span):
            window = sorted(order[start : start + span], key=lambda i: -self.lengths[i])
            batches += [window[k : k + self.batch_size] for k in range(0, len(window), self.batch_size)]
        yield from (batches[i] for i in torch.randperm(len(batches), generator=generator).tolist())


def other_images(pixel_values: torch.Tensor | None) -> torch.Tensor | None:
    """The batch's images reassigned so that every sample gets a different image than its own (the next one in
    the batch that differs), or None if the batch has fewer than two distinct images. Held-out files often list
    several questions about one image in a row, so a plain roll would mostly hand a sample its own image."""
    if pixel_values is None:
        return None
    flat = pixel_values.flatten(1)
    n, picks = flat.shape[0], []
    for i in range(n):
        pick = next((j for k in range(1, n) if not torch.equal(flat[j := (i + k) % n], flat[i])), None)
        if pick is None:
            return None
        picks.append(pick)
    return pixel_values[picks]


@torch.no_grad()
def evaluate_loss(model, loader, accelerator: Accelerator) -> dict[str, float]:
    """Mean loss over answer tokens of a held-out set, and the same loss with every image swapped for another
    sample's (`eval_loss_other_image`, where a batch has two images or more). The gap between the two shows
    whether the model answers from the image: a model that ignores it scores the same on both."""
    model.eval()
    zero = torch.zeros((), device=accelerator.device)
    total, count, swapped, swapped_count = zero.clone(), zero.clone(), zero.clone(), zero.clone()
    for batch in loader:
        tokens = (batch["labels"][:, 1:] != -100).sum()
        total += model(**batch, logits_to_keep=1).loss * tokens
        count += tokens
        others = other_images(batch.get("pixel_values"))
        if others is not None:
            swapped += model(**{**batch, "pixel_values": others}, logits_to_keep=1).loss * tokens
            swapped_count += tokens
    total, count = accelerator.reduce(total), accelerator.reduce(count)
    swapped, swapped_count = accelerator.reduce(swapped), accelerator.reduce(swapped_count)
    model.train()
    losses = {"eval_loss": float(total / count.clamp_min(1))}
    if float(swapped_count):
        losses["eval_loss_other_image"] = float(swapped / swapped_count)
    return losses


def cpu_has_bf16() -> bool:
    """Whether this CPU runs bf16 matrix products natively (AVX512-BF16 or AMX), as oneDNN reports it (False
    where a torch build cannot tell)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def mixed_precision_for(requested: str) -> str:
    """The mixed precision `Accelerator` gets for `TrainConfig.mixed_precision` on this machine.

    "auto" is bf16 on CUDA and "no" elsewhere. "bf16" on a CPU without bf16 instructions falls back to "no"
    with a warning: autocast there runs emulated kernels, and the first step of a fine-tune stage of the
    default model (8 images) had not finished after 8 minutes on a 2-core AVX2 EPYC, where float32 takes 14 s.
    """
    if torch.cuda.is_available():
        return "bf16" if requested == "auto" else requested
    if requested == "bf16" and not cpu_has_bf16():
        warnings.warn(
            "mixed_precision: bf16 asked for, but this CPU has no bf16 instructions (AVX512-BF16 or AMX), "
            "where bf16 autocast is many times slower than float32: training in float32 instead.",
            stacklevel=2,
        )
        return "no"
    return "no" if requested == "auto" else requested


def run_stage(model, processor, stage: StageConfig, out_dir: Path, config: TrainConfig, resume: bool = True):
    """Train one stage; returns the model and the stage's log (step, loss, samples/s, eval loss)."""
    accelerator = Accelerator(
        gradient_accumulation_steps=stage.gradient_accumulation,
        mixed_precision=mixed_precision_for(config.mixed_precision),
    )
    seed = config.seed if stage.seed is None else stage.seed
    set_seed(seed)
    if "lora" in stage.train:
        add_lora(model, config.lora)
    n_trainable = set_trainable(model, stage.train)
    # The stage's starting point (also when resuming: the saved state is loaded after this).
    start = (
        {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
        if stage.average_with_start
        else {}
    )
    if stage.gradient_checkpointing:
        model.activation_checkpointing_enable({"use_reentrant": False})
    train_loader = _loader(stage.data, stage.image_root, processor, stage, shuffle=True, seed=seed)
    eval_loader = (
        _loader(stage.eval_data, None, processor, stage, shuffle=False, seed=seed, limit=stage.eval_samples)
        if stage.eval_data
        else None
    )
    steps_per_epoch = math.ceil(len(train_loader) / stage.gradient_accumulation)
    total_steps = stage.max_steps or max(1, math.ceil(stage.epochs * steps_per_epoch))
    optimizer = torch.optim.AdamW(parameter_groups(model, stage), weight_decay=stage.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, int(stage.warmup_ratio * total_steps), total_steps)
    batches = train_loader.batch_sampler
    model, optimizer, train_loader, scheduler = accelerator.prepare(model, optimizer, train_loader, scheduler)
    if eval_loader is not None:
        eval_loader = accelerator.prepare(eval_loader)

    state_dir = out_dir / "state"
    log_path = out_dir / "log.jsonl"
    step = 0
    if resume and (state_dir / "step.json").is_file():
        accelerator.load_state(str(state_dir))
        step = json.loads((state_dir / "step.json").read_text())["step"]
        if isinstance(batches, LengthGroupedBatches):  # the resumed pass's order, not the first one's
            batches.passes = step // steps_per_epoch
        accelerator.print(f"[{stage.name}] resuming at step {step}/{total_steps}")
        if accelerator.is_main_process and log_path.exists():  # drop what was logged after the saved step
            kept = [record for record in read_log(log_path) if record["step"] <= step]
            log_path.write_text("".join(json.dumps(record) + "\n" for record in kept))
    elif log_path.exists() and accelerator.is_main_process:
        log_path.unlink()

    accelerator.print(
        f"[{stage.name}] {n_trainable:,} trainable parameters ({', '.join(stage.train)}), "
        f"{total_steps} steps of {stage.batch_size * stage.gradient_accumulation} samples"
    )
    model.train()
    progress = tqdm(total=total_steps, initial=step, desc=stage.name, disable=not accelerator.is_main_process)
    started, seen = time.perf_counter(), 0
    while step < total_steps:
        # A resumed stage skips the batches of its current epoch that it already used.
        skip = (step % steps_per_epoch) * stage.gradient_accumulation if resume else 0
        loader = accelerator.skip_first_batches(train_loader, skip) if skip else train_loader
        for batch in loader:
            with accelerator.accumulate(model):
                loss = model(**batch, logits_to_keep=1).loss
                accelerator.backward(loss)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            seen += batch["input_ids"].shape[0] * accelerator.num_processes
            if not accelerator.sync_gradients:
                continue
            step += 1
            record = {
                "step": step,
                "loss": float(loss.detach()),
                "lr": scheduler.get_last_lr()[0],
                "samples_per_s": seen / (time.perf_counter() - started),
            }
            if eval_loader is not None and ((stage.eval_every and step % stage.eval_every == 0) or step == total_steps):
                record |= evaluate_loss(model, eval_loader, accelerator)
            if step == total_steps and start:
                average_with(accelerator.unwrap_model(model), start, stage.average_with_start)
                record["average_with_start"] = stage.average_with_start
                if eval_loader is not None:
                    record |= {f"averaged_{k}": v for k, v in evaluate_loss(model, eval_loader, accelerator).items()}
            if accelerator.is_main_process:
                with log_path.open("a") as log:
                    log.write(json.dumps(record) + "\n")
            progress.set_postfix(loss=f"{record['loss']:.3f}", samples_s=f"{record['samples_per_s']:.1f}")
            progress.update()
            if stage.save_every and step % stage.save_every == 0 and step < total_steps:
                accelerator.save_state(str(state_dir))
                if accelerator.is_main_process:
                    (state_dir / "step.json").write_text(json.dumps({"step": step}))
            if step >= total_steps:
                break
        resume = False
    progress.close()
    accelerator.wait_for_everyone()
    model = accelerator.unwrap_model(model)
    if stage.gradient_checkpointing:
        model.activation_checkpointing_disable()
    if accelerator.is_main_process:
        if config.save_base_llm:
            model.save_pretrained(out_dir)
            processor.save_pretrained(out_dir)
        else:
            save_without_base(model, processor, out_dir, base_llm=config.model["llm"])
        plot_log(log_path, out_dir / "loss.png", title=f"{stage.name}: training loss")
    return model


@torch.no_grad()
def average_with(model, start: dict[str, torch.Tensor], weight: float) -> None:
    """Move each parameter named in `start` `weight` of the way from its value now to its value there."""
    params = dict(model.named_parameters())
    for name, value in start.items():
        param = params[name]
        if param.shape != value.shape:
            raise ValueError(
                f"average_with_start: {name} is {tuple(param.shape)} now but was {tuple(value.shape)} "
                "at the stage's start (a sharded model); use it without FSDP."
            )
        param.lerp_(value.to(param.device, param.dtype), weight)


def read_log(log_path: Path) -> list[dict]:
    return [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]


def plot_log(log_path: Path, png_path: Path, title: str) -> None:
    records = read_log(log_path)
    series = {"train loss": [(r["step"], r["loss"]) for r in records]}
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    if evals:
        series["eval loss"] = evals
    swapped = [(r["step"], r["eval_loss_other_image"]) for r in records if "eval_loss_other_image" in r]
    if swapped:
        series["eval loss, images swapped"] = swapped
    line_chart(series, title=title, x_label="step").save(png_path)


def prepare_shapesworld(
    out_dir: str,
    train_images: int,
    test_images: int,
    image_size: int = 128,
    seed: int = 0,
    train_questions_per_image: int = 4,
):
    """Generate the train and test splits unless they are already there (splits are disjoint by construction).
    The test split always asks 4 questions per image; training images may get more (each answer then costs
    fewer image tokens when `group_turns` merges them into one conversation)."""
    for split, n_images, questions in (
        ("train", train_images, train_questions_per_image),
        ("test", test_images, 4),
    ):
        path = Path(out_dir) / f"{split}.json"
        if path.is_file():
            asked = Counter(record["image"] for record in json.loads(path.read_text()))
            if set(asked.values()) != {questions}:
                raise ValueError(
                    f"{path} has {sorted(set(asked.values()))} questions per image but the config asks for "
                    f"{questions}; delete {path} to regenerate it."
                )
        else:
            generate_dataset(
                out_dir, n_images, seed=seed, image_size=image_size, questions_per_image=questions, split=split
            )


def train(config: str | os.PathLike | TrainConfig, resume: bool = True) -> Path:
    """Run every stage of a training config (a yaml path or a TrainConfig); returns the final checkpoint
    directory."""
    if not isinstance(config, TrainConfig):
        config = TrainConfig.from_yaml(config)
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.resolved.json").write_text(json.dumps(asdict(config), indent=2))
    if config.shapesworld is not None:
        prepare_shapesworld(**config.shapesworld)
    if config.vision_pretraining is not None:
        encoder_dir = Path(config.model["vision"])
        if not (encoder_dir / "config.json").is_file():
            pretrain_vision(VisionPretrainConfig(**config.vision_pretraining), encoder_dir)
    model, processor = None, None
    for stage in config.stages:
        stage_dir = out / stage.name
        if (
            resume
            and is_checkpoint(stage_dir)
            and (stage_dir / "log.jsonl").is_file()
            and not (stage_dir / "state").exists()
        ):
            print(f"[{stage.name}] already done: {stage_dir}")
            model, processor = load_model(stage_dir, device="cpu", merge_adapters=False)
            continue
        if model is None:
            model, processor = initial_model(config)
        stage_dir.mkdir(parents=True, exist_ok=True)
        model = run_stage(model, processor, stage, stage_dir, config, resume)
        if (stage_dir / "state").exists():
            shutil.rmtree(stage_dir / "state")  # the stage finished: its resume state is no longer needed
    return out / config.stages[-1].name
