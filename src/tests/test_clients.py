"""The shim inside real training clients, on the default engine: Lightning's ``fit`` and resume from its
checkpoint, and Hugging Face's way of saving (the model as safetensors, through accelerate's
``save_state``/``load_state``), for ADOPT, DAG and AutoSGM. Each resumed run must equal the
uninterrupted run exactly. A client that is not installed skips its tests."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import optorch

CONFIGS = {
    "adopt": {"name": "adopt", "lr": 0.01, "weight_decay": 0.01},
    "dag": {"name": "dag", "lr": 0.05, "momentum": 0.9, "shrink": {"warmup_steps": 3}},
    "autosgm": {"name": "autosgm", "lr": 0.01},
}
STEPS, RESUME_AT = 8, 5


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1)).double()


def dataset() -> torch.utils.data.TensorDataset:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=generator, dtype=torch.float64)
    return torch.utils.data.TensorDataset(x, torch.sin(x.sum(1, keepdim=True)))


def assert_same_params(a: nn.Module, b: nn.Module) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p.detach(), q.detach()), name


# ------------------------------------------------------------------------------------------------
# Lightning


def _lightning_run(config: dict, max_epochs: int, tmp_path, resume_from=None, save_to=None):
    lightning = pytest.importorskip("lightning.pytorch")

    class Module(lightning.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = make_model()

        def training_step(self, batch, _):
            x, y = batch
            return nn.functional.mse_loss(self.net(x), y)

        def configure_optimizers(self):
            return optorch.build(config, self.net.parameters())

        def train_dataloader(self):
            return torch.utils.data.DataLoader(dataset(), batch_size=16, shuffle=False)

    module = Module()
    trainer = lightning.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=max_epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, ckpt_path=resume_from)
    if save_to is not None:
        trainer.save_checkpoint(save_to)
    return module.net, trainer.optimizers[0]


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_lightning_fit_and_resume_equal_the_uninterrupted_run(name, tmp_path):
    # Epochs of 4 batches: a checkpoint mid-epoch would make Lightning replay batches on resume.
    config = CONFIGS[name]
    whole, optimizer = _lightning_run(config, 3, tmp_path)
    assert isinstance(optimizer, optorch.Optimizer) and optimizer.engine in ("compiled", "eager")
    checkpoint = tmp_path / "resume.ckpt"
    _lightning_run(config, 2, tmp_path, save_to=checkpoint)
    resumed, resumed_optimizer = _lightning_run(config, 3, tmp_path, resume_from=checkpoint)
    leaf = resumed_optimizer.state_dict()["state"][0]
    assert int(leaf["step"] if "step" in leaf else resumed_optimizer.shared["global_step"]) == 12  # 3 epochs of 4
    assert_same_params(resumed, whole)
    assert not torch.equal(whole[0].weight.detach(), make_model()[0].weight.detach()), "nothing trained"


# ------------------------------------------------------------------------------------------------
# Hugging Face style: safetensors for the model, accelerate's save_state / load_state


def _accelerate_run(config: dict, steps: range, tmp_path, load=None, save=None):
    accelerate = pytest.importorskip("accelerate")
    pytest.importorskip("safetensors")
    accelerator = accelerate.Accelerator(cpu=True, project_dir=tmp_path)
    model = make_model()
    optimizer = optorch.build(config, model.parameters())
    loader = torch.utils.data.DataLoader(dataset(), batch_size=16, shuffle=False)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    if load is not None:
        accelerator.load_state(load)
    batches = list(loader)
    for i in steps:
        x, y = batches[i % len(batches)]
        optimizer.zero_grad()
        accelerator.backward(nn.functional.mse_loss(model(x), y))
        optimizer.step()
    if save is not None:
        accelerator.save_state(save, safe_serialization=True)  # the model as safetensors, as the HF Trainer saves it
    return accelerator.unwrap_model(model)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_accelerate_save_state_with_safetensors_resumes_exactly(name, tmp_path):
    config = CONFIGS[name]
    whole = _accelerate_run(config, range(STEPS), tmp_path / "a")
    saved = tmp_path / "state"
    _accelerate_run(config, range(RESUME_AT), tmp_path / "b", save=saved)
    assert any(path.suffix == ".safetensors" for path in saved.iterdir())
    resumed = _accelerate_run(config, range(RESUME_AT, STEPS), tmp_path / "c", load=saved)
    assert_same_params(resumed, whole)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_safetensors_model_and_torch_saved_optimizer_resume_exactly(name, tmp_path):
    """The HF Trainer's files without the Trainer: model.safetensors and optimizer.pt."""
    safetensors = pytest.importorskip("safetensors.torch")
    config = CONFIGS[name]
    data = list(torch.utils.data.DataLoader(dataset(), batch_size=16, shuffle=False))

    def train(model, optimizer, steps):
        for i in steps:
            x, y = data[i % len(data)]
            optimizer.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            optimizer.step()

    whole = make_model()
    whole_optimizer = optorch.build(config, whole.parameters())
    train(whole, whole_optimizer, range(RESUME_AT))
    safetensors.save_model(whole, tmp_path / "model.safetensors")
    torch.save(whole_optimizer.state_dict(), tmp_path / "optimizer.pt")
    train(whole, whole_optimizer, range(RESUME_AT, STEPS))

    resumed = make_model()
    safetensors.load_model(resumed, tmp_path / "model.safetensors")
    optimizer = optorch.build(config, resumed.parameters())
    optimizer.load_state_dict(torch.load(tmp_path / "optimizer.pt", weights_only=True))
    train(resumed, optimizer, range(RESUME_AT, STEPS))
    assert_same_params(resumed, whole)
