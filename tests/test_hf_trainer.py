"""Specification of crcd_plugin.integrations.hf: CRCDTrainer, a drop-in transformers.Trainer with CRCD.

Tiny BERT, ViT and Llama models built from configs (no hub access), CPU only.
"""

import copy
import math

import pytest
import torch
from conftest import V020_BANK, V020_RELATION
from torch import nn

pytest.importorskip("transformers")

from safetensors.torch import load_file  # noqa: E402
from transformers import (  # noqa: E402
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2ForSequenceClassification,
    LlamaConfig,
    LlamaForSequenceClassification,
    RobertaConfig,
    RobertaForSequenceClassification,
    TrainerCallback,
    TrainingArguments,
    ViTConfig,
    ViTForImageClassification,
)

import crcd_plugin  # noqa: E402
from crcd_plugin.distiller import DistillSchedule  # noqa: E402
from crcd_plugin.hooks import FeatureCapture  # noqa: E402
from crcd_plugin.integrations.hf import (  # noqa: E402
    CRCD_STATE_NAME,
    LOSS_COMPONENTS,
    CRCDConfig,
    CRCDTrainer,
    classified_token,
    default_head,
)

VOCAB, SEQ, NUM_LABELS, PAD = 40, 8, 3, 0
SMALL = {"queue_size": 32, "embed_dim": 8}
# SMALL on 0.2.0's relation defaults (tests/conftest.py), for the tests whose assertions were written against them:
# every sample an anchor (no random draw to align) and both sides' loss (both memories written, both heads trained).
V020_SMALL = dict(V020_RELATION, **SMALL)


def queue_config(relation=SMALL, **weights) -> "crcd_plugin.CRCDConfig":
    """``crcd_config=`` with a queue of ``relation``'s size and the given weights."""
    return crcd_plugin.CRCDConfig(relation=crcd_plugin.RelationConfig(negatives="queue", **relation), **weights)


pytestmark = pytest.mark.usefixtures("single_thread")  # tests/conftest.py


# ---- tiny models and data -------------------------------------------------------------------------


def bert(hidden: int, seed: int = 0, **config) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    return BertForSequenceClassification(
        BertConfig(
            vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=1, num_attention_heads=2,
            intermediate_size=2 * hidden, max_position_embeddings=SEQ, num_labels=NUM_LABELS,
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=PAD, **config,
        )
    )


def vit(hidden: int, seed: int = 0) -> ViTForImageClassification:
    torch.manual_seed(seed)
    return ViTForImageClassification(
        ViTConfig(
            image_size=8, patch_size=4, num_channels=1, hidden_size=hidden, num_hidden_layers=1,
            num_attention_heads=2, intermediate_size=2 * hidden, num_labels=NUM_LABELS,
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        )
    )


def llama(hidden: int, seed: int = 0) -> LlamaForSequenceClassification:
    torch.manual_seed(seed)
    return LlamaForSequenceClassification(
        LlamaConfig(
            vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
            num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=SEQ,
            num_labels=NUM_LABELS, pad_token_id=PAD,
        )
    )


class TextSet(torch.utils.data.Dataset):
    """Right-padded token sequences of varying length; the label depends on the last real token."""

    def __init__(self, size: int, seed: int = 0, with_index: bool = False) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(1, VOCAB, (size, SEQ), generator=g)
        lengths = torch.randint(2, SEQ + 1, (size,), generator=g)
        self.mask = (torch.arange(SEQ) < lengths[:, None]).long()
        self.ids = self.ids * self.mask  # pad = 0 after each sequence
        self.labels = self.ids[torch.arange(size), lengths - 1] % NUM_LABELS
        self.with_index = with_index

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        item = {"input_ids": self.ids[i], "attention_mask": self.mask[i], "labels": self.labels[i]}
        if self.with_index:
            item["index"] = torch.tensor(i)
        return item


class ImageSet(torch.utils.data.Dataset):
    def __init__(self, size: int, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.pixels = torch.randn(size, 1, 8, 8, generator=g)
        self.labels = (self.pixels.mean(dim=(1, 2, 3)) > 0).long() + (self.pixels[:, 0, 0, 0] > 1).long()

    def __len__(self) -> int:
        return len(self.pixels)

    def __getitem__(self, i: int) -> dict:
        return {"pixel_values": self.pixels[i], "labels": self.labels[i]}


ARCHITECTURES = {
    "bert": (lambda: bert(16), lambda: bert(24, seed=1), TextSet),
    "vit": (lambda: vit(16), lambda: vit(24, seed=1), ImageSet),
    "llama": (lambda: llama(16), lambda: llama(24, seed=1), TextSet),
}


def training_args(tmp_path, **overrides) -> TrainingArguments:
    options = dict(
        output_dir=str(tmp_path), per_device_train_batch_size=8, per_device_eval_batch_size=8,
        max_steps=2, learning_rate=1e-3, logging_steps=1, save_strategy="no", report_to=[],
        use_cpu=True, disable_tqdm=True, seed=0, dataloader_num_workers=0,
    )
    options.update(overrides)
    return TrainingArguments(**options)


def make_trainer(tmp_path, student=None, teacher=None, data=None, config=None, eval_loss="task", **args) -> CRCDTrainer:
    return CRCDTrainer(
        model=student if student is not None else bert(16),
        teacher_model=teacher if teacher is not None else bert(24, seed=1),
        args=training_args(tmp_path, **args),
        train_dataset=data if data is not None else TextSet(32),
        eval_dataset=TextSet(16, seed=1),
        crcd_config=config if config is not None else queue_config(gradient_element=True, feature_weight=0.3),
        eval_loss=eval_loss,
    )


def crcd_state(trainer: CRCDTrainer) -> dict:
    return {k: v.clone() for k, v in trainer.distiller.crcd_state_dict().items()}


def assert_states_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# ---- feature source ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "build, head",
    [
        (lambda: bert(16), "classifier"),
        (lambda: vit(16), "classifier"),
        (lambda: llama(16), "score"),
        (lambda: GPT2ForSequenceClassification(GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=1, n_head=2,
                                                           n_positions=SEQ, num_labels=3, pad_token_id=PAD)),
         "score"),
        (lambda: RobertaForSequenceClassification(RobertaConfig(
            vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
            max_position_embeddings=SEQ + 2, num_labels=3)), "classifier.out_proj"),
    ],
    ids=["bert", "vit", "llama", "gpt2", "roberta"],
)
def test_default_head_is_found_from_the_architecture(build, head):
    assert default_head(build()) == head


def test_a_model_without_a_known_head_gets_an_error_naming_the_option_to_set():
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ValueError, match=r"CRCDConfig\(teacher_head="):
        default_head(model, "teacher_head")


@pytest.mark.parametrize("padding", ["right", "left"])
def test_classified_token_picks_the_rows_the_decoder_model_itself_classifies(padding):
    model = llama(16).eval()
    data = TextSet(6)
    ids, mask = data.ids, data.mask
    if padding == "left":
        ids, mask = ids.flip(-1), mask.flip(-1)
    inputs = {"input_ids": ids, "attention_mask": mask}
    with FeatureCapture(model) as capture, torch.no_grad():
        capture.add("score", name="per_token")
        logits = model(**inputs).logits
        per_token = capture.pop()["per_token"]  # [B, T, C]
    position = classified_token(model, inputs)
    assert torch.equal(per_token[torch.arange(len(ids)), position], logits)


# ---- training, logging, accumulation ---------------------------------------------------------------


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_training_logs_every_loss_component(tmp_path, arch):
    student, teacher, dataset = ARCHITECTURES[arch]
    trainer = make_trainer(tmp_path, student(), teacher(), dataset(32), max_steps=2)
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 2
    for entry in logs:
        assert set(LOSS_COMPONENTS) <= entry.keys()
        assert all(math.isfinite(entry[name]) for name in LOSS_COMPONENTS)
        assert entry["kd_loss"] > 0 and entry["crcd_feature_loss"] > 0 and entry["crcd_gradient_loss"] > 0


def test_logged_components_are_averaged_over_the_logging_interval(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=2, logging_steps=2)
    seen = []
    forward = trainer.distiller.forward

    def recording_forward(*args, **kwargs):
        out = forward(*args, **kwargs)
        seen.append({name: out[name].item() for name in LOSS_COMPONENTS})
        return out

    trainer.distiller.forward = recording_forward
    trainer.train()
    (entry,) = [entry for entry in trainer.state.log_history if "loss" in entry]
    for name in LOSS_COMPONENTS:
        assert entry[name] == pytest.approx(sum(step[name] for step in seen) / len(seen), rel=1e-6)


def parameter_update(trainer: CRCDTrainer) -> dict:
    before = {n: p.detach().clone() for n, p in trainer.distiller.named_parameters() if not n.startswith("teacher.")}
    trainer.train()
    return {n: p.detach() - before[n] for n, p in trainer.distiller.named_parameters() if n in before}


SGD = dict(
    optim="sgd", learning_rate=0.5, weight_decay=0.0, max_grad_norm=0.0, lr_scheduler_type="constant", max_steps=1
)


def test_accumulating_two_batches_of_8_equals_one_batch_of_16_without_relation_terms(tmp_path):
    relation = crcd_plugin.RelationConfig(negatives="batch")
    config = crcd_plugin.CRCDConfig(kd_weight=0.9, feature_weight=0.0, relation=relation)
    accumulated = parameter_update(make_trainer(
        tmp_path / "a", config=config, data=TextSet(16), per_device_train_batch_size=8,
        gradient_accumulation_steps=2, **SGD))
    single = parameter_update(make_trainer(
        tmp_path / "b", config=config, data=TextSet(16), per_device_train_batch_size=16, **SGD))
    assert accumulated.keys() == single.keys()
    assert any(delta.abs().max() > 0 for delta in single.values())
    for name in single:
        torch.testing.assert_close(accumulated[name], single[name], rtol=1e-4, atol=1e-7, msg=name)


def test_accumulated_update_with_crcd_is_the_mean_of_the_micro_batch_gradients(tmp_path):
    trainer = make_trainer(tmp_path, data=TextSet(16), per_device_train_batch_size=8, gradient_accumulation_steps=2,
                           config=queue_config(V020_SMALL, gradient_element=True, feature_weight=0.3), **SGD)
    replica = copy.deepcopy(trainer.distiller)
    micro_batches = []
    forward = trainer.distiller.forward

    def recording_forward(inputs, labels, index=None, **kwargs):
        micro_batches.append((copy.deepcopy(inputs), labels.clone()))
        return forward(inputs, labels, index, **kwargs)

    trainer.distiller.forward = recording_forward
    update = parameter_update(trainer)

    # The documented rule: each micro-batch's loss (its own mean) is divided by the accumulation
    # steps, once; the queue and the NCE constant move between micro-batches as they do here.
    replica.train()
    for inputs, labels in micro_batches:
        (replica(inputs, labels)["loss"] / len(micro_batches)).backward()
    assert len(micro_batches) == 2
    crcd_names = [n for n in update if not n.startswith("student.")]
    assert crcd_names and any(update[n].abs().max() > 0 for n in crcd_names)
    for name, param in replica.named_parameters():
        if name in update:
            expected = -SGD["learning_rate"] * (param.grad if param.grad is not None else torch.zeros_like(param))
            torch.testing.assert_close(update[name], expected, rtol=1e-4, atol=1e-7, msg=name)


# ---- teacher, optimizer ------------------------------------------------------------------------------


def test_teacher_is_frozen_in_eval_mode_and_bitwise_unchanged_by_training(tmp_path):
    teacher = bert(24, seed=1)
    before = copy.deepcopy(teacher.state_dict())
    trainer = make_trainer(tmp_path, teacher=teacher, max_steps=2)
    trainer.train()
    assert trainer.teacher_model is teacher and not teacher.training
    assert not any(p.requires_grad for p in teacher.parameters())
    assert_states_equal(before, teacher.state_dict())


def test_crcd_heads_are_in_the_optimizer_with_trainers_weight_decay_rules(tmp_path):
    trainer = make_trainer(tmp_path, weight_decay=0.01)
    optimizer = trainer.create_optimizer()
    decay_of = {id(p): group["weight_decay"] for group in optimizer.param_groups for p in group["params"]}
    heads = trainer.distiller.crcd_named_parameters()
    assert heads and all(id(p) in decay_of for _, p in heads)
    assert {decay_of[id(p)] for n, p in heads if n.endswith("bias")} == {0.0}
    assert {decay_of[id(p)] for n, p in heads if n.endswith("weight")} == {0.01}
    assert not any(id(p) in decay_of for p in trainer.teacher_model.parameters())


def test_crcd_head_gradients_are_cleared_after_every_optimizer_step(tmp_path):
    config = queue_config(V020_SMALL, gradient_element=True, feature_weight=0.3)
    trainer = make_trainer(tmp_path, config=config, max_steps=1)
    grads_at_step = []

    class Probe(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            grads_at_step.append([p.grad is not None for _, p in trainer.distiller.crcd_named_parameters()])

    trainer.add_callback(Probe())
    trainer.train()
    assert grads_at_step and all(grads_at_step[0])
    assert all(p.grad is None for _, p in trainer.distiller.crcd_named_parameters())


# ---- evaluate, predict -----------------------------------------------------------------------------------


def test_eval_loss_is_the_students_task_loss_and_leaves_crcd_state_alone(tmp_path):
    trainer = make_trainer(tmp_path)
    trainer.train()
    state = crcd_state(trainer)
    metrics = trainer.evaluate()
    data = trainer.eval_dataset
    with torch.no_grad():
        logits = trainer.model.eval()(input_ids=data.ids, attention_mask=data.mask).logits
    expected = nn.functional.cross_entropy(logits, data.labels).item()
    assert metrics["eval_loss"] == pytest.approx(expected, rel=1e-5)
    assert_states_equal(state, crcd_state(trainer))


def test_eval_loss_total_is_the_distillation_loss_without_the_gradient_element(tmp_path):
    config = queue_config(V020_SMALL, gradient_element=True, feature_weight=0.3)
    trainer = make_trainer(tmp_path, config=config, eval_loss="total", per_device_eval_batch_size=16)
    metrics = trainer.evaluate()
    data = trainer.eval_dataset
    trainer.distiller.eval()
    with torch.no_grad():
        out = trainer.distiller({"input_ids": data.ids, "attention_mask": data.mask}, data.labels)
    assert out["crcd_gradient_loss"] == 0
    assert metrics["eval_loss"] == pytest.approx(out["loss"].item(), rel=1e-5)


def test_predict_returns_student_logits_and_metrics(tmp_path):
    trainer = make_trainer(tmp_path)
    result = trainer.predict(TextSet(12, seed=2))
    assert result.predictions.shape == (12, NUM_LABELS)
    assert math.isfinite(result.metrics["test_loss"])


# ---- checkpoints, save_model, resume --------------------------------------------------------------------


class SnapshotAtTrainBegin(TrainerCallback):
    """Copies the CRCD state once the Trainer has loaded its checkpoint, before any step."""

    def __init__(self) -> None:
        self.trainer = None
        self.state = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.state = crcd_state(self.trainer)


def test_resume_restores_crcd_state_bit_for_bit_and_continues_as_uninterrupted(tmp_path):
    config = dict(save_strategy="steps", save_steps=2, max_steps=4, logging_steps=2)
    options = lambda: queue_config(gradient_element=True, schedule="step")  # noqa: E731
    uninterrupted = make_trainer(tmp_path / "a", config=options(), **config)
    uninterrupted.train()
    checkpoint = tmp_path / "a" / "checkpoint-2"
    saved = torch.load(checkpoint / CRCD_STATE_NAME, weights_only=True)
    assert any(key.startswith("schedule.") for key in saved)

    resumed = make_trainer(tmp_path / "b", student=bert(16, seed=5), config=options(), **config)
    snapshot = SnapshotAtTrainBegin()
    snapshot.trainer = resumed
    resumed.add_callback(snapshot)
    resumed.train(resume_from_checkpoint=str(checkpoint))

    assert_states_equal(saved, snapshot.state)
    assert int(snapshot.state["schedule.progress"]) == 1  # the last step run (numbered from 0)
    assert_states_equal(crcd_state(uninterrupted), crcd_state(resumed))
    assert_states_equal(uninterrupted.model.state_dict(), resumed.model.state_dict())


def test_checkpoints_and_saved_student_hold_no_teacher_or_crcd_weights(tmp_path):
    trainer = make_trainer(tmp_path, save_strategy="steps", save_steps=1, max_steps=1)
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    expected = set(bert(16).state_dict())
    for folder in (tmp_path / "checkpoint-1", tmp_path / "final"):
        assert set(load_file(str(folder / "model.safetensors"))) <= expected
        loaded = BertForSequenceClassification.from_pretrained(str(folder))
        for name, tensor in loaded.state_dict().items():
            assert torch.equal(tensor, trainer.model.state_dict()[name]), name
    assert (tmp_path / "checkpoint-1" / CRCD_STATE_NAME).is_file()
    assert not (tmp_path / "final" / CRCD_STATE_NAME).exists()


# ---- negatives ---------------------------------------------------------------------------------------------


def test_memory_bank_reads_the_index_column_when_columns_are_kept(tmp_path):
    relation = crcd_plugin.RelationConfig(**dict(V020_BANK, embed_dim=8, num_negatives=16), negatives="bank")
    config = crcd_plugin.CRCDConfig(feature_weight=0.3, relation=relation)
    trainer = make_trainer(tmp_path, data=TextSet(32, with_index=True), config=config,
                           remove_unused_columns=False, max_steps=1, per_device_train_batch_size=8)
    before = crcd_state(trainer)
    trainer.train()
    after = crcd_state(trainer)
    bank_keys = [k for k in after if after[k].dim() == 2 and after[k].shape[0] == 32]
    assert bank_keys
    changed_rows = (after[bank_keys[0]] != before[bank_keys[0]]).any(dim=1)
    assert changed_rows.sum() == 8  # one batch of 8 rows written
    trainer.evaluate()  # the index column never reaches the model


def test_memory_bank_with_columns_dropped_is_rejected_naming_the_argument(tmp_path):
    with pytest.raises(ValueError, match="remove_unused_columns=False"):
        make_trainer(tmp_path, config=crcd_plugin.CRCDConfig(relation=crcd_plugin.RelationConfig(negatives="bank")))


# ---- bad arguments --------------------------------------------------------------------------------------------


def test_missing_teacher_is_a_type_error(tmp_path):
    with pytest.raises(TypeError, match="teacher_model"):
        CRCDTrainer(model=bert(16), args=training_args(tmp_path), train_dataset=TextSet(8))


def test_a_regression_model_is_rejected(tmp_path):
    student = bert(16)
    student.config.num_labels = 1
    with pytest.raises(ValueError, match="single-label"):
        make_trainer(tmp_path, student=student)


def test_a_ready_optimizer_without_the_crcd_heads_is_rejected(tmp_path):
    student = bert(16)
    optimizer = torch.optim.SGD(student.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="optimizer_cls_and_kwargs"):
        CRCDTrainer(model=student, teacher_model=bert(24, seed=1), args=training_args(tmp_path),
                    train_dataset=TextSet(8), optimizers=(optimizer, None),
                    crcd_config=queue_config(feature_weight=0.3))


# ---- 0.3 spelling -------------------------------------------------------------------------------------


def test_the_new_spelling_takes_crcd_plugins_config_and_trainer_options(tmp_path):
    import crcd_plugin

    config = crcd_plugin.CRCDConfig(gradient_element=True, relation=crcd_plugin.RelationConfig(**SMALL))
    trainer = CRCDTrainer(model=bert(16), teacher_model=bert(24, seed=1), args=training_args(tmp_path),
                          train_dataset=TextSet(32), crcd_config=config, student_classifier="classifier")
    assert trainer.distiller.config == config.replace(label_smoothing=0.0)
    assert trainer.distiller.student_classifier == "classifier"
    trainer.train()
    assert all(math.isfinite(e["crcd_gradient_loss"]) for e in trainer.state.log_history if "loss" in e)


def test_a_ready_distill_schedule_counts_optimizer_steps(tmp_path):
    # A ready DistillSchedule object reaches the trainer only through 0.2.0's hf.CRCDConfig (the
    # current spelling is a schedule kind in crcd_plugin.CRCDConfig, spread over Trainer's steps).
    schedule = DistillSchedule(total_steps=2, kind="step", until=0.5)
    with pytest.warns(DeprecationWarning, match="hf.CRCDConfig is deprecated"):
        config = CRCDConfig(crcd_options=SMALL, schedule=schedule)
    trainer = make_trainer(tmp_path, config=config, max_steps=2)
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert logs[0]["kd_loss"] > 0 and logs[1]["kd_loss"] == 0  # w = 0 from step 1 of 2
    assert int(schedule.progress) == 1


def test_the_0_2_0_config_warns_and_maps_onto_the_new_one():
    import crcd_plugin

    with pytest.warns(DeprecationWarning, match=r"hf.CRCDConfig is deprecated.*crcd_plugin.CRCDConfig"):
        old = CRCDConfig(alpha=0.5, gradient_element=True, crcd_options=SMALL, schedule="step", teacher_head="x")
    config, options = old.split()
    assert config.kd_weight == 0.5 and config.gradient_element and config.schedule == "step"
    assert config.relation == crcd_plugin.RelationConfig(negatives="queue", **SMALL)
    assert options["teacher_classifier"] == "x" and options["index_column"] == "index"
