"""Distil a text classifier with CRCD inside a Hugging Face ``Trainer`` script: swap one class.

Offline by default (tiny BERTs built from configs, a synthetic 3-class sentiment task with negation,
a word-level tokenizer built here), about a minute on two CPU cores (one torch thread, see --threads):

    python examples/hf_text_classification.py

With a network, any hub checkpoints that share one tokenizer:

    python examples/hf_text_classification.py --student prajjwal1/bert-tiny --teacher prajjwal1/bert-small

The teacher is first fine-tuned on the task with a plain ``Trainer`` (skip with --teacher-epochs 0
for a teacher that already knows it), then the student is trained twice from the same start: plain
``Trainer`` (cross-entropy) and ``CRCDTrainer`` (CE + KD + CRCD), and both are evaluated.
"""

from __future__ import annotations

import argparse
import random

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    DataCollatorWithPadding,
    PreTrainedTokenizerFast,
    Trainer,
    TrainingArguments,
)

from crcd_plugin import CRCDConfig, RelationConfig
from crcd_plugin.integrations.hf import CRCDTrainer

POSITIVE = "good great fine nice happy superb lovely brilliant".split()
NEGATIVE = "bad awful poor sad terrible boring ugly dull".split()
NEUTRAL = "the a movie plot film actor scene story was is and it this very quite".split()
LABELS = ("negative", "neutral", "positive")


def sentence(rng: random.Random) -> tuple[str, int]:
    """A few words; 'not' flips the next sentiment word. Label: the sign of the sentiment sum."""
    words, score = [], 0
    for _ in range(rng.randint(4, 12)):
        kind = rng.random()
        if kind < 0.3:
            negated = rng.random() < 0.3
            positive = rng.random() < 0.5
            words += (["not"] if negated else []) + [rng.choice(POSITIVE if positive else NEGATIVE)]
            score += (1 if positive else -1) * (-1 if negated else 1)
        else:
            words.append(rng.choice(NEUTRAL))
    return " ".join(words), 1 + (score > 0) - (score < 0)


def word_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the task's words, with BERT's special tokens and [CLS] ... [SEP]."""
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
    vocab = {word: i for i, word in enumerate(specials + ["not"] + POSITIVE + NEGATIVE + NEUTRAL)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]"
    )


class TextDataset(torch.utils.data.Dataset):
    def __init__(self, size: int, tokenizer, seed: int) -> None:
        rng = random.Random(seed)
        texts, self.labels = zip(*(sentence(rng) for _ in range(size)))
        self.encodings = tokenizer(list(texts), truncation=True, max_length=32)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {**{key: values[i] for key, values in self.encodings.items()}, "labels": self.labels[i]}


def tiny_bert(tokenizer, hidden: int, layers: int) -> BertForSequenceClassification:
    config = BertConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
        intermediate_size=4 * hidden, max_position_embeddings=64, num_labels=len(LABELS),
        pad_token_id=tokenizer.pad_token_id,
    )
    return BertForSequenceClassification(config)


def accuracy(prediction) -> dict:
    return {"accuracy": float((prediction.predictions.argmax(-1) == prediction.label_ids).mean())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--student", help="hub name of the student (default: a tiny BERT from a config)")
    parser.add_argument("--teacher", help="hub name of the teacher (default: a small BERT from a config)")
    parser.add_argument("--train-size", type=int, default=2000)
    parser.add_argument("--eval-size", type=int, default=500)
    parser.add_argument("--teacher-epochs", type=float, default=30)
    parser.add_argument("--epochs", type=float, default=10)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--output-dir", default="hf_text_output")
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

    tokenizer = AutoTokenizer.from_pretrained(options.student) if options.student else word_tokenizer()
    train, val = TextDataset(options.train_size, tokenizer, 1), TextDataset(options.eval_size, tokenizer, 2)

    def load(name, hidden, layers):
        if name:
            return AutoModelForSequenceClassification.from_pretrained(name, num_labels=len(LABELS),
                                                                      ignore_mismatched_sizes=True)
        return tiny_bert(tokenizer, hidden, layers)

    def arguments(name: str, epochs: float, learning_rate: float) -> TrainingArguments:
        return TrainingArguments(
            output_dir=f"{options.output_dir}/{name}", num_train_epochs=epochs, learning_rate=learning_rate,
            per_device_train_batch_size=options.batch_size, per_device_eval_batch_size=128,
            eval_strategy="epoch", save_strategy="no", logging_steps=20, report_to=[], seed=options.seed,
            disable_tqdm=True,
        )

    teacher = load(options.teacher, 64, 2)
    common = dict(train_dataset=train, eval_dataset=val, data_collator=DataCollatorWithPadding(tokenizer),
                  compute_metrics=accuracy)
    if options.teacher_epochs > 0:
        Trainer(model=teacher, args=arguments("teacher", options.teacher_epochs, 1e-3), **common).train()
    teacher_acc = Trainer(model=teacher, args=arguments("teacher", 1, 0.0), **common).evaluate()["eval_accuracy"]

    torch.manual_seed(options.seed + 1)
    student = load(options.student, 32, 1)
    initial = {k: v.clone() for k, v in student.state_dict().items()}
    baseline = Trainer(model=student, args=arguments("student_ce", options.epochs, 1e-3), **common)
    baseline.train()
    ce_acc = baseline.evaluate()["eval_accuracy"]

    student.load_state_dict(initial)  # the same start for the distilled student
    # The one change to a Trainer script: the class, the teacher and (optionally) a CRCD config.
    trainer = CRCDTrainer(
        model=student, teacher_model=teacher, args=arguments("student_crcd", options.epochs, 1e-3),
        # The library's defaults: negatives="batch" (the other rows of the batch, InfoNCE) is the
        # default without a dataset index (docs/reliability.md), written out here for readers.
        # gradient_element=True adds the second element.
        crcd_config=CRCDConfig(relation=RelationConfig(negatives="batch")),
        **common,
    )
    trainer.train()
    crcd_acc = trainer.evaluate()["eval_accuracy"]
    trainer.save_model(f"{options.output_dir}/student")  # the student alone, no teacher, no CRCD heads
    tokenizer.save_pretrained(f"{options.output_dir}/student")
    AutoModelForSequenceClassification.from_pretrained(f"{options.output_dir}/student")

    for entry in [entry for entry in trainer.state.log_history if "loss" in entry][-1:]:
        print("last logged losses:", {k: round(v, 4) for k, v in entry.items() if k.endswith("loss")})
    print(f"teacher accuracy {teacher_acc:.3f} | student CE {ce_acc:.3f} | student CRCD {crcd_acc:.3f}")
    print(f"distilled student saved to {options.output_dir}/student")


if __name__ == "__main__":
    main()
