"""Models: a timm classifier, and BloodNet (timm encoder + U-Net decoder; predicted blood volume feeds the head)."""

from __future__ import annotations

import timm
import torch
import torch.nn.functional as F
from torch import nn

from src.cnn.losses import ANY, lse_pool
from src.config import Config
from src.constants import BLOOD_HU, BLOOD_HU_EDGE, BLOOD_WINDOW, LABELS
from src.data.windows import window_channel
from src.errors import InputError

# log1p(mm³ / VOLUME_SCALE) keeps the volume feature O(1): a large bleed is ~10⁴–10⁵ mm³ per slice.
VOLUME_SCALE_MM3 = 100.0
MIN_DECODER_CHANNELS = 16
FULL_RES_CHANNELS = 16  # seg_full_res: the last block runs at the input's size, so it is kept narrow
MASK_CUTOFF = 0.5  # pixel probability counted as blood in the reported volume and drawn in overlays (the weak mode
# calibrates its own per model, never lower: src/cnn/volume_cutoff.py)


def create_timm(cfg: Config, **kwargs) -> nn.Module:
    """timm.create_model with an optional local checkpoint; timm adapts the stem for in_chans != 3."""
    pretrained = bool(cfg.pretrained_path)
    if pretrained and not __import__("os").path.exists(cfg.pretrained_path):
        raise InputError(f"{cfg.pretrained_path}: pretrained checkpoint not found (config key pretrained_path)")
    overlay = {"file": cfg.pretrained_path} if pretrained else None
    try:
        return timm.create_model(
            cfg.backbone, pretrained=pretrained, pretrained_cfg_overlay=overlay, in_chans=cfg.in_chans, **kwargs
        )
    except RuntimeError as err:  # timm's "Unknown model" and bad checkpoints both land here
        raise InputError(f"backbone {cfg.backbone!r}: {str(err).splitlines()[0]}") from err


def blood_hu_prior(window_value: torch.Tensor, window: str = BLOOD_WINDOW) -> torch.Tensor:
    """Soft 0-1 membership of constants.BLOOD_HU, from an image channel scaled to [0, 1] in the named window."""
    _, low, width = window_channel(window)
    hu = low + window_value.float() * width
    low, high = BLOOD_HU
    return torch.sigmoid((hu - low) / BLOOD_HU_EDGE) * torch.sigmoid((high - hu) / BLOOD_HU_EDGE)


def gate_logits(seg_logits: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
    """The logit of sigmoid(seg_logits) × prior: a pixel outside the blood range cannot be called blood however sure
    the decoder is. Computed in log space (log p − log(1 − p)), so it stays finite and differentiable."""
    log_p = (F.logsigmoid(seg_logits.float()) + torch.log(prior.clamp_min(1e-6))).clamp(max=-1e-6)
    return log_p - torch.log1p(-torch.exp(log_p))


class Classifier(nn.Module):
    """A timm model with six outputs; the embedding is timm's pre-logits vector."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.net = create_timm(cfg, num_classes=len(LABELS), drop_rate=cfg.drop_rate)

    def head_parameters(self) -> list[nn.Parameter]:
        return list(self.net.get_classifier().parameters())

    def forward(self, image: torch.Tensor, voxel_mm3: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        embedding = self.net.forward_head(self.net.forward_features(image), pre_logits=True)
        return {"logits": self.net.get_classifier()(embedding), "embedding": embedding}


class DecoderBlock(nn.Module):
    def __init__(self, in_channels: int, skip_channels: int, out_channels: int):
        super().__init__()
        self.block = nn.Sequential(
            nn.Conv2d(in_channels + skip_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None) -> torch.Tensor:
        size = skip.shape[-2:] if skip is not None else tuple(2 * s for s in x.shape[-2:])
        x = F.interpolate(x, size=size, mode="nearest")
        return self.block(torch.cat([x, skip], dim=1) if skip is not None else x)


class SegClassifier(nn.Module):
    """BloodNet (arch=bloodnet) and its multi-task ablation (arch=multitask).

    The shared encoder feeds a U-Net decoder (per-pixel blood logit at input resolution) and a classification
    head on the pooled bottleneck. For bloodnet the head also sees log1p(predicted volume): the sum of pixel
    probabilities × the voxel volume (mm³), as in the paper's Figure 5.
    """

    def __init__(self, cfg: Config):
        super().__init__()
        self.use_volume = cfg.arch == "bloodnet"
        # The centre slice's channel of the prior's window (channels are slice-major: 3 windows per slice).
        self.prior_channel = 3 * cfg.context + window_channel(BLOOD_WINDOW)[0] if cfg.hu_prior else None
        self.encoder = create_timm(cfg, features_only=True)
        channels = self.encoder.feature_info.channels()
        decoder_channels = [max(MIN_DECODER_CHANNELS, int(c * cfg.decoder_width)) for c in channels[:-1]][::-1]
        self.decoder = nn.ModuleList()
        in_channels = channels[-1]
        for skip_channels, out_channels in zip(channels[:-1][::-1], decoder_channels):
            self.decoder.append(DecoderBlock(in_channels, skip_channels, out_channels))
            in_channels = out_channels
        if cfg.seg_full_res:  # reads the (normalised) image itself: no encoder feature is at full resolution
            self.decoder.append(DecoderBlock(in_channels, cfg.in_chans, FULL_RES_CHANNELS))
            in_channels = FULL_RES_CHANNELS
        self.seg_head = nn.Conv2d(in_channels, 1, kernel_size=1)
        self.dropout = nn.Dropout(cfg.drop_rate)
        # The map's evidence is a BloodNet feature, as the volume is (multitask reads neither).
        self.map_evidence_r = cfg.map_evidence_r if self.use_volume else 0.0
        self.n_map_features = int(self.use_volume) + int(self.map_evidence_r > 0)
        self.head = nn.Linear(channels[-1] + self.n_map_features, len(LABELS))
        # any_from_map: the `any` logit reads the map's features alone, not the embedding. It starts as the pooled
        # map itself (weight 1 on the pool, 0 on the volume): the map's own "blood somewhere on this slice" logit
        self.any_head = None
        if cfg.any_from_map and self.map_evidence_r > 0:
            self.any_head = nn.Linear(self.n_map_features, 1)
            with torch.no_grad():
                self.any_head.weight.zero_()
                self.any_head.weight[0, -1] = 1.0
                self.any_head.bias.zero_()
        self.volume_feature_grad = cfg.volume_feature_grad
        self.volume_cutoff = MASK_CUTOFF  # a checkpoint's calibrated value replaces it (checkpoints.deploy)

    def head_parameters(self) -> list[nn.Parameter]:
        return list(self.head.parameters()) + (list(self.any_head.parameters()) if self.any_head is not None else [])

    def freeze_map_weights(self) -> torch.utils.hooks.RemovableHandle | None:
        """Zero the gradient of the head's weights on the map's features (its last columns) from now on, so they
        stay as the head step fit them while the embedding's weights go on learning (None: the head reads no map).
        Remove the returned handle to release them. AdamW's decoupled weight decay still shrinks them by
        lr × weight_decay per step (~3e-5 relative over the default's joint step)."""
        if self.n_map_features == 0:
            return None
        keep = torch.ones_like(self.head.weight)
        keep[:, -self.n_map_features:] = 0.0
        return self.head.weight.register_hook(lambda grad: grad * keep.to(grad.dtype))

    def forward(self, image: torch.Tensor, voxel_mm3: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        features = self.encoder(image)
        x = features[-1]
        for block, skip in zip(self.decoder, [*features[:-1][::-1], image]):
            x = block(x, skip)
        seg_logits = self.seg_head(x)
        if seg_logits.shape[-2:] != image.shape[-2:]:
            seg_logits = F.interpolate(seg_logits, size=image.shape[-2:], mode="bilinear", align_corners=False)
        if self.prior_channel is not None:
            seg_logits = gate_logits(seg_logits, blood_hu_prior(image[:, self.prior_channel : self.prior_channel + 1]))
        embedding = features[-1].mean(dim=(2, 3))
        out = {"seg_logits": seg_logits, "embedding": embedding}
        if voxel_mm3 is not None:
            prob = torch.sigmoid(seg_logits.float())
            # The head's feature is the paper's soft sum of probabilities (differentiable). The reported volume
            # counts pixels at p >= volume_cutoff: a faint background of p ~ 0.03 over a whole slice would otherwise
            # add ~10 mL to every slice, blood or not.
            out["volume_mm3"] = prob.sum(dim=(1, 2, 3)) * voxel_mm3.float()
            out["mask_volume_mm3"] = (prob >= self.volume_cutoff).sum(dim=(1, 2, 3)).float() * voxel_mm3.float()
        head_input = self.dropout(embedding)
        if self.use_volume:
            if voxel_mm3 is None:
                raise ValueError("bloodnet needs voxel_mm3 to turn the predicted mask into a volume")
            volume = out["volume_mm3"] if self.volume_feature_grad else out["volume_mm3"].detach()
            map_features = [torch.log1p(volume / VOLUME_SCALE_MM3)]
            if self.map_evidence_r > 0:
                # volume_feature_grad governs both: without it only the pixel loss shapes the map
                evidence = lse_pool(seg_logits, self.map_evidence_r)
                map_features.append(evidence if self.volume_feature_grad else evidence.detach())
            head_input = torch.cat([head_input, torch.stack(map_features, dim=1).to(embedding.dtype)], dim=1)
        logits = self.head(head_input)
        if self.any_head is not None:
            any_logit = self.any_head(head_input[:, -self.n_map_features :])
            logits = torch.cat([logits[:, :ANY], any_logit, logits[:, ANY + 1 :]], dim=1)
        out["logits"] = logits
        return out


def build_model(cfg: Config) -> nn.Module:
    return Classifier(cfg) if cfg.arch == "classifier" else SegClassifier(cfg)
