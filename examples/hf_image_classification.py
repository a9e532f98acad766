r"""Distil an image classifier (ViT) with CRCD inside a Hugging Face ``Trainer`` script: swap one class.

Offline by default: scikit-learn's handwritten digits (1797 images, 8x8, shipped with the package)
upsampled to 16x16, tiny ViTs built from configs; under a minute on two CPU cores (one torch thread):

    python examples/hf_image_classification.py

With a network, hub checkpoints (the images are then resized to the student's input size and
given three channels):

    python examples/hf_image_classification.py \
        --student WinKawaks/vit-tiny-patch16-224 --teacher google/vit-base-patch16-224

The teacher is first fine-tuned with a plain ``Trainer`` (skip with --teacher-epochs 0), then the
student is trained twice from the same start: plain ``Trainer`` and ``CRCDTrainer``.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from transformers import (
    AutoModelForImageClassification,
    Trainer,
    TrainingArguments,
    ViTConfig,
    ViTForImageClassification,
)

from crcd_plugin import CRCDConfig, RelationConfig
from crcd_plugin.integrations.hf import CRCDTrainer

NUM_CLASSES = 10


class DigitImages(torch.utils.data.Dataset):
    """Digits as ``pixel_values [C, S, S]`` in [-1, 1] (the ViT image processors' range)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, size: int, channels: int) -> None:
        pixels = F.interpolate(images[:, None] / 8.0 - 1.0, size=(size, size), mode="bilinear", align_corners=False)
        self.pixels = pixels.expand(-1, channels, -1, -1).contiguous()
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {"pixel_values": self.pixels[i], "labels": self.labels[i]}


def tiny_vit(hidden: int, layers: int) -> ViTForImageClassification:
    return ViTForImageClassification(
        ViTConfig(
            image_size=16, patch_size=4, num_channels=1, hidden_size=hidden, num_hidden_layers=layers,
            num_attention_heads=4, intermediate_size=4 * hidden, num_labels=NUM_CLASSES,
        )
    )


def accuracy(prediction) -> dict:
    return {"accuracy": float((prediction.predictions.argmax(-1) == prediction.label_ids).mean())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--student", help="hub name of the student (default: a tiny ViT from a config)")
    parser.add_argument("--teacher", help="hub name of the teacher (default: a small ViT from a config)")
    parser.add_argument("--train-size", type=int, default=1400, help="the rest of the 1797 digits is for eval")
    parser.add_argument("--teacher-epochs", type=float, default=30)
    parser.add_argument("--epochs", type=float, default=15)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--output-dir", default="hf_image_output")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads for torch (default 1; 0 leaves torch's default)")
    options = parser.parse_args()
    if options.threads > 0:
        # Models this small spend a step on thread hand-offs, not arithmetic: on a 2-core machine
        # that others share, one thread ran these examples 3x faster than two (a short image run:
        # 15 s against 44 s at load 3), and about 10x faster at a heavier load.
        # Raise it for hub-sized models or a GPU (the GPU ignores it).
        torch.set_num_threads(options.threads)
    torch.manual_seed(options.seed)

    def load(name, hidden, layers):
        if name:
            return AutoModelForImageClassification.from_pretrained(name, num_labels=NUM_CLASSES,
                                                                   ignore_mismatched_sizes=True)
        return tiny_vit(hidden, layers)

    teacher = load(options.teacher, 64, 2)
    torch.manual_seed(options.seed + 1)
    student = load(options.student, 32, 1)
    size, channels = student.config.image_size, student.config.num_channels

    digits = load_digits()
    images, labels = torch.tensor(digits.images, dtype=torch.float32), torch.tensor(digits.target)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(options.seed))
    train_rows, eval_rows = order[: options.train_size], order[options.train_size:]
    train = DigitImages(images[train_rows], labels[train_rows], size, channels)
    val = DigitImages(images[eval_rows], labels[eval_rows], size, channels)

    def arguments(name: str, epochs: float) -> TrainingArguments:
        return TrainingArguments(
            output_dir=f"{options.output_dir}/{name}", num_train_epochs=epochs, learning_rate=2e-3,
            per_device_train_batch_size=options.batch_size, per_device_eval_batch_size=256,
            eval_strategy="epoch", save_strategy="no", logging_steps=20, report_to=[], seed=options.seed,
            disable_tqdm=True,
        )

    common = dict(train_dataset=train, eval_dataset=val, compute_metrics=accuracy)
    if options.teacher_epochs > 0:
        Trainer(model=teacher, args=arguments("teacher", options.teacher_epochs), **common).train()
    teacher_acc = Trainer(model=teacher, args=arguments("teacher", 1), **common).evaluate()["eval_accuracy"]

    initial = {k: v.clone() for k, v in student.state_dict().items()}
    baseline = Trainer(model=student, args=arguments("student_ce", options.epochs), **common)
    baseline.train()
    ce_acc = baseline.evaluate()["eval_accuracy"]

    student.load_state_dict(initial)  # the same start for the distilled student
    # The one change to a Trainer script: the class, the teacher and (optionally) a CRCD config.
    trainer = CRCDTrainer(
        model=student, teacher_model=teacher, args=arguments("student_crcd", options.epochs),
        # The library's defaults: negatives="batch" (the other rows of the batch, InfoNCE) is the
        # default without a dataset index (docs/reliability.md), written out here for readers.
        # gradient_element=True adds the second element.
        crcd_config=CRCDConfig(relation=RelationConfig(negatives="batch")),
        **common,
    )
    trainer.train()
    crcd_acc = trainer.evaluate()["eval_accuracy"]
    trainer.save_model(f"{options.output_dir}/student")  # the student alone, no teacher, no CRCD heads
    AutoModelForImageClassification.from_pretrained(f"{options.output_dir}/student")

    for entry in [entry for entry in trainer.state.log_history if "loss" in entry][-1:]:
        print("last logged losses:", {k: round(v, 4) for k, v in entry.items() if k.endswith("loss")})
    print(f"teacher accuracy {teacher_acc:.3f} | student CE {ce_acc:.3f} | student CRCD {crcd_acc:.3f}")
    print(f"distilled student saved to {options.output_dir}/student")


if __name__ == "__main__":
    main()
