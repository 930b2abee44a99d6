"""The training engine on toy models: EMA trails the raw weights, accumulation matches a bigger batch, seeded epochs,
the optimizer's parameter groups, the loader's worker count and the wrappers around the network."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from src.cnn.distributed import auto_workers, unwrap
from src.cnn.loop import make_optimizer, train_one_epoch
from src.cnn.predict import predict_loader
from src.cnn.runtime import Runtime, make_ema, wrap_model
from src.cnn.sampling import EpochSampler, SeededItems
from src.cnn.schedule import Phase
from src.config import load_config
from src.constants import LABELS

CPU = Runtime(rank=0, world=1, device=torch.device("cpu"), amp_dtype=None, channels_last=False)
PHASE = Phase("classify", epochs=1, seg_lambda=0.0)


class Toy(nn.Module):
    """The model interface the loop expects (image, voxel volume → dict with logits), with no randomness."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Linear(3 * 4 * 4, 8)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, len(LABELS))

    def head_parameters(self) -> list[nn.Parameter]:
        return list(self.head.parameters())

    def forward(self, image, voxel_mm3=None):
        embedding = self.norm(self.body(image.flatten(1)))
        return {"logits": self.head(embedding), "embedding": embedding}


def toy_batches(n_images: int, batch: int) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (n_images, 3, 4, 4), generator=g, dtype=torch.uint8)
    labels = (torch.rand(n_images, len(LABELS), generator=g) > 0.6).float()
    return [{"image": images[i : i + batch], "labels": labels[i : i + batch], "voxel_mm3": torch.ones(batch),
             "index": torch.arange(i, i + batch)} for i in range(0, n_images, batch)]


def train_toy(batch: int, accumulate: int, ema: bool = False, n_images: int = 16):
    cfg = load_config(None, ["arch=classifier", "warmup_epochs=0", "grad_clip=1e6", "weight_decay=0.01",
                             "lr=0.05", f"accumulate={accumulate}", f"ema={ema}", "ema_decay=0.9"])
    model = Toy()
    optimizer = make_optimizer(cfg, model, head_only=False)
    average = make_ema(model, cfg)
    snapshots, grads = [], []  # the raw weights after every optimizer step, the gradients it stepped with
    optimizer.register_step_post_hook(lambda *_: snapshots.append(copy.deepcopy(model.state_dict())))
    optimizer.register_step_pre_hook(lambda *_: grads.append([p.grad.clone() for p in model.parameters()]))
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    weights = torch.tensor(cfg.class_weights)
    row = train_one_epoch(model, toy_batches(n_images, batch), optimizer, scaler, PHASE, 0, cfg, CPU, weights, "t",
                          ema=average)
    model.grads = grads
    return model, average, snapshots, row


def test_accumulating_two_batches_of_b_matches_one_batch_of_2b():
    accumulated, _, steps_a, _ = train_toy(batch=4, accumulate=2)
    big, _, steps_b, _ = train_toy(batch=8, accumulate=1)
    assert len(steps_a) == len(steps_b) == 2  # 4 batches of 4 in groups of 2 = 2 optimizer steps
    # The gradients themselves, not only the weights: Adam would hide a gradient off by a constant factor.
    for mine, theirs in zip(accumulated.grads, big.grads, strict=True):
        for a, b in zip(mine, theirs, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    for name, value in big.state_dict().items():
        torch.testing.assert_close(accumulated.state_dict()[name], value, rtol=1e-5, atol=1e-6)
    small, _, steps_c, _ = train_toy(batch=4, accumulate=1)  # without accumulation: 4 steps, other weights
    assert len(steps_c) == 4 and not torch.allclose(small.head.weight, big.head.weight, atol=1e-4)


def test_short_last_group_still_steps():
    _, _, steps, row = train_toy(batch=4, accumulate=3)  # 4 batches: a group of 3, then one of 1
    assert len(steps) == 2 and np.isfinite(row["train_loss"])


def test_ema_differs_from_and_trails_the_raw_weights():
    model, average, snapshots, _ = train_toy(batch=2, accumulate=1, ema=True)
    start = Toy().state_dict()
    raw, smooth = model.state_dict(), average.module.state_dict()
    # The exponential average of the raw weights after each step, with timm's warmed-up decay at that step.
    expected = {k: v.clone() for k, v in start.items()}
    for step, weights in enumerate(snapshots, start=1):
        decay = average.get_decay(step)
        expected = {k: decay * expected[k] + (1 - decay) * weights[k] for k in expected}
    for name in raw:
        torch.testing.assert_close(smooth[name], expected[name], rtol=1e-5, atol=1e-6)
        assert not torch.allclose(smooth[name], raw[name])
    # Trailing: the average has moved less far from the start than the weights it follows.
    moved = {k: torch.linalg.norm(raw[k] - start[k]) for k in raw}
    assert all(torch.linalg.norm(smooth[k] - start[k]) < moved[k] for k in raw)
    assert 0.0 < average.get_decay(len(snapshots)) <= 0.9


def test_optimizer_groups_come_from_timm():
    cfg = load_config(None, ["arch=classifier", "weight_decay=0.05"])
    model = Toy()
    optimizer = make_optimizer(cfg, model, head_only=False)
    for group in optimizer.param_groups:  # norms and biases (1-D) carry no weight decay
        assert all((p.ndim > 1) == (group["weight_decay"] == 0.05) for p in group["params"])
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(model.parameters()))
    head = make_optimizer(cfg, model, head_only=True)
    assert {id(p) for g in head.param_groups for p in g["params"]} == {id(p) for p in model.head_parameters()}
    with pytest.raises(Exception, match="sgd"):
        make_optimizer(load_config(None, ["optimizer=sgd"]), model, head_only=False)


def test_epoch_sampler_is_a_function_of_seed_and_epoch():
    sampler = EpochSampler(10, seed=3)
    sampler.set_epoch(1)
    first = list(sampler)
    assert first == list(sampler) and sorted(i for i, _ in first) == list(range(10))
    assert {e for _, e in first} == {1}
    sampler.set_epoch(2)
    assert [i for i, _ in sampler] != [i for i, _ in first]
    shards = [EpochSampler(10, seed=3, rank=r, world=3) for r in range(3)]
    items = [i for s in shards for i, _ in s]
    assert all(len(s) == 4 for s in shards) and set(items) == set(range(10)) and len(items) == 12
    assert len(list(EpochSampler(10, seed=3, limit=4))) == 4


class Augmented(torch.utils.data.Dataset):
    """Random crops' stand-in: an albumentations pipeline over a fixed image, nothing else random."""

    def __init__(self):
        import albumentations as A

        self.augment = A.Compose([A.HorizontalFlip(p=0.5), A.CoarseDropout(p=0.5), A.RandomBrightnessContrast(p=1)])
        self.image = np.random.default_rng(0).integers(0, 255, (16, 16, 3), dtype=np.uint8)

    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(self.augment(image=self.image)["image"])


def test_augmentation_is_seeded_per_item_and_epoch_whatever_the_workers():
    items = SeededItems(Augmented(), seed=5)
    assert torch.equal(items[(3, 1)], SeededItems(Augmented(), seed=5)[(3, 1)])  # another worker's copy
    assert not torch.equal(items[(3, 1)], items[(3, 2)]) or not torch.equal(items[(4, 1)], items[(4, 2)])

    def epoch(workers: int) -> torch.Tensor:
        sampler = EpochSampler(8, seed=5)
        loader = DataLoader(items, batch_size=4, sampler=sampler, num_workers=workers,
                            persistent_workers=workers > 0)
        out = []
        for e in (0, 1):  # persistent workers: the epoch reaches them through the sampler only
            sampler.set_epoch(e)
            out += list(loader)
        return torch.cat(out)

    assert torch.equal(epoch(0), epoch(2))


def test_auto_workers(monkeypatch):
    assert auto_workers(load_config(None, ["num_workers=0"])) == 0
    assert auto_workers(load_config(None, ["num_workers=3"])) == 3
    monkeypatch.setattr("os.sched_getaffinity", lambda _: set(range(16)), raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert auto_workers(load_config(None, [])) == 3  # 16 cores / 4 ranks, one kept for the main process
    monkeypatch.setattr("os.sched_getaffinity", lambda _: {0}, raising=False)
    assert auto_workers(load_config(None, [])) == 1


def test_compiled_and_wrapped_models_unwrap_to_the_plain_network():
    model = Toy()
    wrapped = wrap_model(model, load_config(None, ["compile=true"]), CPU)  # compiles lazily: nothing runs here
    assert wrapped is not model and unwrap(wrapped) is model
    assert wrap_model(model, load_config(None, []), CPU) is model


def test_validation_predicts_probabilities_without_embeddings():
    loader = toy_batches(6, 3)
    full = predict_loader(Toy(), loader, CPU.device, progress=False)
    light = predict_loader(Toy(), loader, CPU.device, progress=False, embeddings=False)
    assert "embedding" in full and "embedding" not in light
    np.testing.assert_array_equal(light["probs"], full["probs"])
