"""Tiny real Lightning and HF Trainer runs that write checkpoints for the checkpoint tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


def fit_lightning(root: Path) -> Path:
    """Fit a tiny LightningModule for 2 epochs on CPU; returns the checkpoint ModelCheckpoint saved."""
    import lightning as L
    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

    class TinyModule(L.LightningModule):
        def __init__(self, hidden: int = 8) -> None:
            super().__init__()
            self.save_hyperparameters()
            self.net = torch.nn.Sequential(torch.nn.Linear(4, hidden), torch.nn.BatchNorm1d(hidden),
                                           torch.nn.ReLU(), torch.nn.Linear(hidden, 1))

        def training_step(self, batch: Any, _: int) -> torch.Tensor:
            x, y = batch
            loss = torch.nn.functional.mse_loss(self.net(x), y)
            self.log("train_loss", loss)
            return loss

        def validation_step(self, batch: Any, _: int) -> None:
            x, y = batch
            self.log("val_loss", torch.nn.functional.mse_loss(self.net(x), y))

        def configure_optimizers(self) -> Any:
            optimizer = torch.optim.Adam(self.parameters(), lr=1e-2)
            return {"optimizer": optimizer, "lr_scheduler": torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer),
                    "monitor": "val_loss"}

    torch.manual_seed(0)
    x = torch.randn(32, 4)
    data = torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True))
    loader = torch.utils.data.DataLoader(data, batch_size=8)
    checkpoint = ModelCheckpoint(dirpath=root / "checkpoints", monitor="val_loss", save_top_k=1, save_last=True)
    trainer = L.Trainer(
        max_epochs=2, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=root,
        callbacks=[checkpoint, EarlyStopping(monitor="val_loss", patience=5), ModelCheckpoint(root / "plain")],
    )
    trainer.fit(TinyModule(), loader, loader)
    return Path(checkpoint.best_model_path)


def train_hf(root: Path) -> Path:
    """Train a tiny randomly initialised BERT classifier for 4 steps with HF Trainer; returns ``checkpoint-4``."""
    from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments

    torch.manual_seed(0)
    config = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=16, num_labels=2)
    model = BertForSequenceClassification(config)

    class Data(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
        def __len__(self) -> int:
            return 16

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            g = torch.Generator().manual_seed(i)
            return {"input_ids": torch.randint(0, 64, (8,), generator=g), "labels": torch.tensor(i % 2)}

    args = TrainingArguments(
        output_dir=str(root), max_steps=4, per_device_train_batch_size=4, save_steps=4, save_strategy="steps",
        logging_steps=1, report_to=[], use_cpu=True, disable_tqdm=True, dataloader_num_workers=0,
    )
    Trainer(model=model, args=args, train_dataset=Data()).train()
    return root / "checkpoint-4"
