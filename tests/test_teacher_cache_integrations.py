"""A TeacherCache in the integrations: Hugging Face CRCDTrainer(teacher_model=cache) and Lightning
CRCDCallback(cache) train as with the live teacher; timm's task refuses a cache with the reason.

The cache is built in sequential batches while the trainers shuffle theirs: a CPU kernel may round
a teacher row differently in another batch, so the runs agree to float rounding, not bit for bit
(tests/test_teacher_cache.py checks the bitwise case on the distiller itself).
"""

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from crcd_plugin import CRCDConfig, RelationConfig, TeacherCache

VOCAB, SEQ, LABELS, N = 20, 6, 3, 32


pytestmark = pytest.mark.usefixtures("single_thread")  # tests/conftest.py


def assert_close_parameters(a: nn.Module, b: nn.Module) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=name)


# ---------------------------------------------------------------------------------- Hugging Face
class TextSet(torch.utils.data.Dataset):
    def __init__(self, with_index: bool) -> None:
        generator = torch.Generator().manual_seed(0)
        self.ids = torch.randint(1, VOCAB, (N, SEQ), generator=generator)
        self.labels = self.ids[:, -1] % LABELS
        self.with_index = with_index

    def __len__(self) -> int:
        return N

    def __getitem__(self, i: int) -> dict:
        item = {"input_ids": self.ids[i], "labels": self.labels[i]}
        return {**item, "index": torch.tensor(i)} if self.with_index else item


def bert(hidden: int, seed: int):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    return BertForSequenceClassification(BertConfig(
        vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=1, num_attention_heads=2, intermediate_size=2 * hidden,
        max_position_embeddings=SEQ, num_labels=LABELS, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    ))


def hf_trainer(tmp_path, teacher, with_index: bool):
    from transformers import TrainingArguments

    from crcd_plugin.integrations.hf import CRCDTrainer

    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=3, learning_rate=1e-2, report_to=[],
        save_strategy="no", use_cpu=True, disable_tqdm=True, seed=0, dataloader_num_workers=0,
        remove_unused_columns=not with_index, logging_steps=1,
    )
    config = CRCDConfig(gradient_element=True, relation=RelationConfig(embed_dim=8))
    return CRCDTrainer(model=bert(8, seed=0), teacher_model=teacher, args=args, train_dataset=TextSet(with_index),
                       crcd_config=config)


def test_hf_trainer_with_a_teacher_cache_trains_as_with_the_live_teacher(tmp_path):
    pytest.importorskip("transformers")
    teacher = bert(16, seed=1).eval()
    cache = TeacherCache.build(tmp_path / "cache", teacher, DataLoader(TextSet(with_index=True), batch_size=8),
                               "classifier", num_samples=N)
    live = hf_trainer(tmp_path / "live", teacher, with_index=False)
    live.train()
    cached = hf_trainer(tmp_path / "cached", cache, with_index=True)
    assert cached.teacher_model is cache and cached.distiller.teacher_classifier == "classifier"
    cached.train()
    assert_close_parameters(live.model, cached.model)
    assert cached.state.log_history[0]["crcd_feature_loss"] == pytest.approx(live.state.log_history[0][
        "crcd_feature_loss"], rel=1e-4)


def test_hf_trainer_with_a_teacher_cache_needs_the_index_column(tmp_path):
    pytest.importorskip("transformers")
    cache = TeacherCache.build(tmp_path / "cache", bert(16, seed=1).eval(),
                               DataLoader(TextSet(with_index=True), batch_size=8), "classifier", num_samples=N)
    with pytest.raises(ValueError, match="TeacherCache need the dataset's 'index' column"):
        hf_trainer(tmp_path / "t", cache, with_index=False)


# ---------------------------------------------------------------------------------- Lightning
def test_lightning_callback_with_a_teacher_cache_trains_as_with_the_live_teacher(tmp_path):
    L = pytest.importorskip("lightning")
    from crcd_plugin.integrations.lightning import CRCDCallback

    class Net(nn.Module):
        def __init__(self, width: int, seed: int) -> None:
            super().__init__()
            torch.manual_seed(seed)
            self.body = nn.Sequential(nn.Linear(12, width), nn.ReLU())
            self.fc = nn.Linear(width, 4)

        def forward(self, x):
            return self.fc(self.body(x))

    class Classifier(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = Net(8, seed=0)

        def training_step(self, batch, batch_idx):
            x, y, _ = batch
            return nn.functional.cross_entropy(self.model(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    generator = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(N, 12, generator=generator), torch.randint(0, 4, (N,), generator=generator),
                         torch.arange(N))
    teacher = Net(16, seed=1).eval()
    cache = TeacherCache.build(tmp_path / "cache", teacher, DataLoader(data, batch_size=8), "fc", num_samples=N)
    config = CRCDConfig(gradient_element=True, relation=RelationConfig(embed_dim=8, num_negatives=8))

    def fit(source):
        module = Classifier()
        callback = CRCDCallback(source, student_classifier="model.fc", config=config, num_samples=N)
        torch.manual_seed(3)
        trainer = L.Trainer(max_epochs=1, accelerator="cpu", devices=1, enable_progress_bar=False, logger=False,
                            enable_model_summary=False, enable_checkpointing=False, callbacks=[callback])
        trainer.fit(module, DataLoader(data, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(1)))
        return module, callback

    (live, live_callback), (cached, cached_callback) = fit(teacher), fit(cache)
    assert cached_callback.teacher_classifier == "fc" and cached_callback.state_key == live_callback.state_key
    assert_close_parameters(live, cached)
    for key, value in live_callback.state_dict()["crcd"].items():
        torch.testing.assert_close(cached_callback.state_dict()["crcd"][key], value, rtol=1e-4, atol=1e-5, msg=key)


# ---------------------------------------------------------------------------------- timm
def test_timm_task_refuses_a_teacher_cache_and_says_why(tmp_path):
    timm = pytest.importorskip("timm")
    from crcd_plugin.integrations.timm import CRCDDistillationTask

    data = TensorDataset(torch.randn(N, 12), torch.randint(0, 4, (N,)), torch.arange(N))
    teacher = nn.Sequential(nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 4)).eval()
    cache = TeacherCache.build(tmp_path / "cache", teacher, DataLoader(data, batch_size=8), "2", num_samples=N)
    student = timm.create_model("test_vit", num_classes=4, img_size=32)
    with pytest.raises(TypeError, match="does not take a TeacherCache: timm's training loop passes no dataset index"):
        CRCDDistillationTask(student, cache, verbose=False)
