#!/usr/bin/env python3
"""Distil a timm teacher into a timm student with CRCD, in timm's idiom (a TrainingTask).

Offline by default: scikit-learn's digits, upsampled to 32x32 RGB, and tiny timm models built
from their configs (pretrained=False). Without --teacher-checkpoint or --teacher-pretrained the
teacher is first trained here with timm's ClassificationTask, on input normalised for the teacher;
the student's input is normalised for the student, and the CRCD task re-normalises it for the
teacher. With --data-dir, an ImageFolder (DIR/train, DIR/validation) through timm's loaders.

    python examples/timm_train.py                      # about a minute on 2 CPU cores
    python examples/timm_train.py --model test_vit --teacher test_vit2 --model-kwargs img_size=32 \
        --opt adamw --lr 2e-3 --weight-decay 0.05
    python examples/timm_train.py --data-dir /data/imagenette --model resnet18 --teacher resnet50 \
        --teacher-pretrained --img-size 224 --epochs 30 --batch-size 128
"""

import argparse
import logging
import time
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from timm.data import create_dataset, create_loader, resolve_data_config
from timm.models import create_model, load_checkpoint
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.task import ClassificationTask
from timm.utils import NativeScaler, ParseKwargs

from crcd_plugin import CRCDConfig, RelationConfig
from crcd_plugin.integrations.timm import CRCDDistillationTask

_logger = logging.getLogger("timm_train")

parser = argparse.ArgumentParser(description="CRCD distillation with timm")
parser.add_argument("--data-dir", default=None, help="ImageFolder root (default: scikit-learn digits)")
parser.add_argument("--train-split", default="train")
parser.add_argument("--val-split", default="validation")
parser.add_argument("--model", default="test_efficientnet", help="student: a timm model name")
parser.add_argument("--teacher", default="test_resnet", help="teacher: a timm model name")
parser.add_argument("--pretrained", action="store_true", help="start the student from timm's pretrained weights")
parser.add_argument("--teacher-pretrained", action="store_true", help="timm's pretrained teacher (downloads)")
parser.add_argument("--teacher-checkpoint", default="", help="a trained teacher checkpoint (skips teacher training)")
parser.add_argument("--model-kwargs", nargs="*", default={}, action=ParseKwargs, help="for both create_model calls")
parser.add_argument("--num-classes", type=int, default=None, help="default: 10 for digits, the folder count else")
parser.add_argument("--img-size", type=int, default=32)
parser.add_argument("--epochs", type=int, default=3)
parser.add_argument("--teacher-epochs", type=int, default=3)
parser.add_argument("-b", "--batch-size", type=int, default=64)
parser.add_argument("--opt", default="sgd")
parser.add_argument("--lr", type=float, default=0.05)
parser.add_argument("--momentum", type=float, default=0.9)
parser.add_argument("--weight-decay", type=float, default=5e-4)
parser.add_argument("--sched", default="cosine")
parser.add_argument("--warmup-epochs", type=int, default=0)
parser.add_argument("--smoothing", type=float, default=0.0, help="label smoothing of the task loss")
parser.add_argument("--gradient-element", action=argparse.BooleanOptionalAction, default=True)
parser.add_argument("--queue-size", type=int, default=256)
parser.add_argument("--embed-dim", type=int, default=64)
parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                    help="mixed precision (default: on where CUDA is available)")
parser.add_argument("--amp-dtype", default="bfloat16", choices=["bfloat16", "float16"])
parser.add_argument("--workers", type=int, default=0)
parser.add_argument("--threads", type=int, default=None,
                    help="CPU intra-op threads (default: 1 for the digits run on CPU, else torch's default)")
parser.add_argument("--output", default="", help="save the final task checkpoint here")
parser.add_argument("--seed", type=int, default=0)


def digits_loaders(data_config, batch_size, seed):
    """scikit-learn's digits as 32x32 RGB tensors, normalised with the data config's mean/std."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # [N, 1, 8, 8] in [0, 1]
    x = F.interpolate(x, size=data_config["input_size"][1:], mode="bilinear", align_corners=False)
    x = x.expand(-1, data_config["input_size"][0], -1, -1)
    mean = torch.tensor(data_config["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(data_config["std"]).view(1, -1, 1, 1)
    x = (x - mean) / std
    y = torch.tensor(digits.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))  # same split for every model
    train, val = order[: int(0.8 * len(y))], order[int(0.8 * len(y)):]
    g = torch.Generator().manual_seed(seed)
    train_set = torch.utils.data.TensorDataset(x[train], y[train])
    val_set = torch.utils.data.TensorDataset(x[val], y[val])
    return (
        torch.utils.data.DataLoader(train_set, batch_size=batch_size, shuffle=True, drop_last=True, generator=g),
        torch.utils.data.DataLoader(val_set, batch_size=256),
    )


def folder_loaders(args, data_config, device):
    """timm's ImageFolder datasets and loaders (augmentation and normalisation from the data config)."""
    loaders = []
    for split, training in ((args.train_split, True), (args.val_split, False)):
        dataset = create_dataset("", root=args.data_dir, split=split, is_training=training)
        loaders.append(create_loader(
            dataset, input_size=data_config["input_size"], batch_size=args.batch_size, is_training=training,
            interpolation=data_config["interpolation"], mean=data_config["mean"], std=data_config["std"],
            crop_pct=data_config["crop_pct"], num_workers=args.workers, device=device,
        ))
    return loaders


def make_loaders(args, model, device):
    data_config = resolve_data_config({"input_size": (3, args.img_size, args.img_size)}, model=model)
    if args.data_dir:
        return folder_loaders(args, data_config, device)
    return digits_loaders(data_config, args.batch_size, args.seed)


@torch.no_grad()
def accuracy(model, loader, device, autocast):
    model.eval()
    correct = total = 0
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        with autocast():
            correct += (model(x).argmax(-1) == y).sum().item()
        total += y.numel()
    return correct / total


def train(task, loader, val_loader, epochs, args, device, autocast, scaler, name, on_epoch=None):
    """timm's loop shape: optimizer and scheduler from timm's factories, one task call per step."""
    optimizer = create_optimizer_v2(
        task.get_trainable_module(), opt=args.opt, lr=args.lr, weight_decay=args.weight_decay, momentum=args.momentum
    )
    lr_scheduler, num_epochs = create_scheduler_v2(
        optimizer, sched=args.sched, num_epochs=epochs, warmup_epochs=args.warmup_epochs,
        updates_per_epoch=len(loader),
    )
    num_updates = 0
    for epoch in range(num_epochs):
        if on_epoch is not None:
            on_epoch(epoch)
        task.train()
        start, sums = time.time(), {}
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            with autocast():
                out = task(x, y)
            optimizer.zero_grad()
            if scaler is not None:
                scaler(out["loss"], optimizer)
            else:
                out["loss"].backward()
                optimizer.step()
            num_updates += 1
            lr_scheduler.step_update(num_updates=num_updates)
            for key, value in out.items():
                if key != "output":
                    sums[key] = sums.get(key, 0.0) + value.detach().float()
        lr_scheduler.step(epoch + 1)
        means = " ".join(f"{k}={float(v) / len(loader):.3f}" for k, v in sums.items())
        acc = accuracy(task.get_eval_model(), val_loader, device, autocast)
        print(f"{name} epoch {epoch}: {means} val_acc={acc:.4f} ({time.time() - start:.1f}s)", flush=True)
    return acc


def main():
    logging.basicConfig(level=logging.WARNING)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.threads or (device.type == "cpu" and not args.data_dir):
        # Tiny models gain nothing from more threads, and on a busy machine they stall each other.
        torch.set_num_threads(args.threads or 1)
    use_amp = device.type == "cuda" if args.amp is None else args.amp
    amp_dtype = getattr(torch, args.amp_dtype)

    def autocast():
        return torch.autocast(device.type, dtype=amp_dtype) if use_amp else nullcontext()

    scaler = NativeScaler(device=device.type) if use_amp and amp_dtype == torch.float16 else None
    num_classes = args.num_classes or (10 if not args.data_dir else None)
    if num_classes is None:
        num_classes = len(create_dataset("", root=args.data_dir, split=args.train_split).reader.class_to_idx)

    teacher = create_model(args.teacher, pretrained=args.teacher_pretrained, num_classes=num_classes,
                           **args.model_kwargs).to(device)
    teacher_loader, teacher_val_loader = make_loaders(args, teacher, device)  # normalised for the teacher
    if args.teacher_checkpoint:
        load_checkpoint(teacher, args.teacher_checkpoint)
    elif not args.teacher_pretrained:
        # Offline: train the teacher first, with timm's own classification task.
        teacher_task = ClassificationTask(teacher, criterion_kwargs={"smoothing": args.smoothing}, device=device,
                                          verbose=False)
        train(teacher_task, teacher_loader, teacher_val_loader, args.teacher_epochs, args, device, autocast, scaler,
              "teacher")
    teacher_acc = accuracy(teacher, teacher_val_loader, device, autocast)

    student = create_model(args.model, pretrained=args.pretrained, num_classes=num_classes,
                           **args.model_kwargs).to(device)
    loader, val_loader = make_loaders(args, student, device)  # normalised for the student
    task = CRCDDistillationTask(
        student, teacher,
        criterion_kwargs={"smoothing": args.smoothing},
        config=CRCDConfig(
            gradient_element=args.gradient_element,
            schedule="step", schedule_until=0.96,
            relation=RelationConfig(queue_size=args.queue_size, embed_dim=args.embed_dim),
        ),
        total_steps=args.epochs,
        device=device,
        verbose=False,
    )
    print(f"teacher {args.teacher} val_acc={teacher_acc:.4f} -> student {args.model}", flush=True)
    acc = train(task, loader, val_loader, args.epochs, args, device, autocast, scaler, "student",
                on_epoch=task.set_progress)
    print(f"student {args.model} final val_acc={acc:.4f}", flush=True)
    if args.output:
        torch.save(task.get_checkpoint_state(), args.output)  # student state_dict + CRCD task_state


if __name__ == "__main__":
    main()
