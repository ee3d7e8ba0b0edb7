"""Minimal PyTorch reference networks for the scorer tests, written from the published architectures.

torchvision (and so pytorch-fid, lpips, piq) cannot be installed beside torch 2.13 here, so the
reference modules are spelled out with plain torch layers, keeping the parameter names of the
original projects: torchvision's Inception-v3 as patched by pytorch-fid, torchvision's
SqueezeNet 1.1 with LPIPS' linear heads, and OpenAI CLIP's ModifiedResNet (RN50) + text transformer.
"""
from collections import OrderedDict

import torch
import torch.nn as tnn
import torch.nn.functional as F


def randomize_batchnorm(module, generator):
    """Give every BatchNorm random affine parameters and running statistics (eval mode)."""
    for m in module.modules():
        if isinstance(m, tnn.BatchNorm2d):
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5, generator=generator)
                m.bias.uniform_(-0.2, 0.2, generator=generator)
                m.running_mean.uniform_(-0.2, 0.2, generator=generator)
                m.running_var.uniform_(0.5, 1.5, generator=generator)
    return module.eval()


# --------------------------------------------------------------------------- FID Inception-v3

class BasicConv2d(tnn.Module):
    def __init__(self, cin, cout, **kw):
        super().__init__()
        self.conv = tnn.Conv2d(cin, cout, bias=False, **kw)
        self.bn = tnn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


class FIDInceptionA(tnn.Module):
    def __init__(self, cin, pool_features):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(cin, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, kernel_size=1)

    def forward(self, x):
        pool = F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)
        return torch.cat([self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)),
                          self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          self.branch_pool(pool)], 1)


class InceptionB(tnn.Module):
    def __init__(self, cin):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x):
        return torch.cat([self.branch3x3(x), self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class FIDInceptionC(tnn.Module):
    def __init__(self, cin, channels_7x7):
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x):
        d = x
        for i in range(1, 6):
            d = getattr(self, f"branch7x7dbl_{i}")(d)
        pool = F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)
        return torch.cat([self.branch1x1(x), self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x))), d,
                          self.branch_pool(pool)], 1)


class InceptionD(tnn.Module):
    def __init__(self, cin):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x):
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class FIDInceptionE(tnn.Module):
    def __init__(self, cin, pool):
        super().__init__()
        self.pool = pool
        self.branch1x1 = BasicConv2d(cin, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(cin, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        d = torch.cat([self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d)], 1)
        if self.pool == "avg":
            p = F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)
        else:
            p = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        return torch.cat([self.branch1x1(x), b3, d, self.branch_pool(p)], 1)


class TorchFIDInception(tnn.Module):
    """torchvision Inception3(num_classes=1008, aux_logits=False) with pytorch-fid's FID blocks."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = FIDInceptionA(192, 32)
        self.Mixed_5c = FIDInceptionA(256, 64)
        self.Mixed_5d = FIDInceptionA(288, 64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = FIDInceptionC(768, 128)
        self.Mixed_6c = FIDInceptionC(768, 160)
        self.Mixed_6d = FIDInceptionC(768, 160)
        self.Mixed_6e = FIDInceptionC(768, 192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = FIDInceptionE(1280, "avg")
        self.Mixed_7c = FIDInceptionE(2048, "max")
        self.fc = tnn.Linear(2048, 1008)

    def features(self, x, dims, resize_input=True):
        """pytorch-fid InceptionV3([block]) forward + the adaptive average pool of get_activations."""
        if resize_input:
            x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        x = 2 * x - 1
        blocks = [[self.Conv2d_1a_3x3, self.Conv2d_2a_3x3, self.Conv2d_2b_3x3, tnn.MaxPool2d(3, 2)],
                  [self.Conv2d_3b_1x1, self.Conv2d_4a_3x3, tnn.MaxPool2d(3, 2)],
                  [self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
                   self.Mixed_6d, self.Mixed_6e],
                  [self.Mixed_7a, self.Mixed_7b, self.Mixed_7c]]
        for block in blocks[: {64: 1, 192: 2, 768: 3, 2048: 4}[dims]]:
            for layer in block:
                x = layer(x)
        return F.adaptive_avg_pool2d(x, (1, 1))[:, :, 0, 0]


# --------------------------------------------------------------------------- SqueezeNet 1.1 + LPIPS

class Fire(tnn.Module):
    def __init__(self, cin, squeeze, e1, e3):
        super().__init__()
        self.squeeze = tnn.Conv2d(cin, squeeze, kernel_size=1)
        self.expand1x1 = tnn.Conv2d(squeeze, e1, kernel_size=1)
        self.expand3x3 = tnn.Conv2d(squeeze, e3, kernel_size=3, padding=1)

    def forward(self, x):
        x = F.relu(self.squeeze(x))
        return torch.cat([F.relu(self.expand1x1(x)), F.relu(self.expand3x3(x))], 1)


class TorchSqueezeNet11(tnn.Module):
    """torchvision squeezenet1_1 (features + classifier, so the state dict matches the published file)."""

    def __init__(self):
        super().__init__()
        self.features = tnn.Sequential(
            tnn.Conv2d(3, 64, kernel_size=3, stride=2), tnn.ReLU(), tnn.MaxPool2d(3, 2, ceil_mode=True),
            Fire(64, 16, 64, 64), Fire(128, 16, 64, 64), tnn.MaxPool2d(3, 2, ceil_mode=True),
            Fire(128, 32, 128, 128), Fire(256, 32, 128, 128), tnn.MaxPool2d(3, 2, ceil_mode=True),
            Fire(256, 48, 192, 192), Fire(384, 48, 192, 192), Fire(384, 64, 256, 256), Fire(512, 64, 256, 256))
        self.classifier = tnn.Sequential(tnn.Dropout(0.5), tnn.Conv2d(512, 1000, 1), tnn.ReLU(),
                                         tnn.AdaptiveAvgPool2d((1, 1)))


class NetLinLayer(tnn.Module):
    def __init__(self, chn):
        super().__init__()
        self.model = tnn.Sequential(tnn.Dropout(), tnn.Conv2d(chn, 1, 1, stride=1, padding=0, bias=False))


class TorchLPIPSSqueeze(tnn.Module):
    """lpips.LPIPS(net="squeeze", version="0.1"): slices of squeezenet1_1.features, heads lin0..lin6."""

    def __init__(self, squeezenet):
        super().__init__()
        self.backbone = squeezenet
        for i, c in enumerate((64, 128, 256, 384, 384, 512, 512)):
            setattr(self, f"lin{i}", NetLinLayer(c))
        self.register_buffer("shift", torch.tensor([-.030, -.088, -.188])[None, :, None, None])
        self.register_buffer("scale", torch.tensor([.458, .448, .450])[None, :, None, None])

    def heads_state_dict(self):
        """What lpips ships as weights/v0.1/squeeze.pth."""
        return {k: v for k, v in self.state_dict().items() if k.startswith("lin")}

    def forward(self, in0, in1):
        def feats(x):
            x = (x - self.shift) / self.scale
            out, start = [], 0
            for end in (2, 5, 8, 10, 11, 12, 13):
                for i in range(start, end):
                    x = self.backbone.features[i](x)
                start = end
                out.append(x / (torch.sqrt(torch.sum(x ** 2, dim=1, keepdim=True)) + 1e-10))
            return out
        f0, f1 = feats(in0), feats(in1)
        return sum(getattr(self, f"lin{k}").model((f0[k] - f1[k]) ** 2).mean([2, 3], keepdim=True)
                   for k in range(7))[:, 0, 0, 0]


# --------------------------------------------------------------------------- OpenAI CLIP (ResNet) for CLIP-IQA

class Bottleneck(tnn.Module):
    def __init__(self, inplanes, planes, stride=1):
        super().__init__()
        self.conv1 = tnn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = tnn.BatchNorm2d(planes)
        self.conv2 = tnn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = tnn.BatchNorm2d(planes)
        self.avgpool = tnn.AvgPool2d(stride) if stride > 1 else tnn.Identity()
        self.conv3 = tnn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = tnn.BatchNorm2d(planes * 4)
        self.downsample = None
        if stride > 1 or inplanes != planes * 4:
            self.downsample = tnn.Sequential(OrderedDict([
                ("-1", tnn.AvgPool2d(stride)), ("0", tnn.Conv2d(inplanes, planes * 4, 1, bias=False)),
                ("1", tnn.BatchNorm2d(planes * 4))]))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(self.avgpool(out)))
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(out + identity)


class AttentionPool2d(tnn.Module):
    def __init__(self, spacial_dim, embed_dim, num_heads, output_dim):
        super().__init__()
        self.positional_embedding = tnn.Parameter(torch.randn(spacial_dim ** 2 + 1, embed_dim) / embed_dim ** 0.5)
        self.k_proj = tnn.Linear(embed_dim, embed_dim)
        self.q_proj = tnn.Linear(embed_dim, embed_dim)
        self.v_proj = tnn.Linear(embed_dim, embed_dim)
        self.c_proj = tnn.Linear(embed_dim, output_dim)
        self.num_heads = num_heads

    def forward(self, x):
        """CLIP-IQA / piq: pos_embedding=False, no positional embedding added."""
        x = x.flatten(2).permute(2, 0, 1)                                  # (HW, B, C)
        x = torch.cat([x.mean(dim=0, keepdim=True), x], dim=0)
        x, _ = F.multi_head_attention_forward(
            query=x, key=x, value=x, embed_dim_to_check=x.shape[-1], num_heads=self.num_heads,
            q_proj_weight=self.q_proj.weight, k_proj_weight=self.k_proj.weight, v_proj_weight=self.v_proj.weight,
            in_proj_weight=None, in_proj_bias=torch.cat([self.q_proj.bias, self.k_proj.bias, self.v_proj.bias]),
            bias_k=None, bias_v=None, add_zero_attn=False, dropout_p=0.0, out_proj_weight=self.c_proj.weight,
            out_proj_bias=self.c_proj.bias, use_separate_proj_weight=True, training=False, need_weights=False)
        return x[0]


class ModifiedResNet(tnn.Module):
    def __init__(self, layers, output_dim, heads, input_resolution, width):
        super().__init__()
        self.conv1 = tnn.Conv2d(3, width // 2, 3, stride=2, padding=1, bias=False)
        self.bn1 = tnn.BatchNorm2d(width // 2)
        self.conv2 = tnn.Conv2d(width // 2, width // 2, 3, padding=1, bias=False)
        self.bn2 = tnn.BatchNorm2d(width // 2)
        self.conv3 = tnn.Conv2d(width // 2, width, 3, padding=1, bias=False)
        self.bn3 = tnn.BatchNorm2d(width)
        self.avgpool = tnn.AvgPool2d(2)
        inplanes = width
        for i, n in enumerate(layers):
            planes, stride = width * 2 ** i, (1 if i == 0 else 2)
            blocks = [Bottleneck(inplanes, planes, stride)] + [Bottleneck(planes * 4, planes) for _ in range(n - 1)]
            inplanes = planes * 4
            setattr(self, f"layer{i + 1}", tnn.Sequential(*blocks))
        self.attnpool = AttentionPool2d(input_resolution // 32, width * 32, heads, output_dim)

    def forward(self, x):
        for conv, bn in [(self.conv1, self.bn1), (self.conv2, self.bn2), (self.conv3, self.bn3)]:
            x = F.relu(bn(conv(x)))
        x = self.avgpool(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.attnpool(x)


class ResidualAttentionBlock(tnn.Module):
    def __init__(self, width, heads, attn_mask):
        super().__init__()
        self.attn = tnn.MultiheadAttention(width, heads)
        self.ln_1 = tnn.LayerNorm(width)
        self.mlp = tnn.Sequential(OrderedDict([("c_fc", tnn.Linear(width, width * 4)), ("gelu", QuickGELU()),
                                               ("c_proj", tnn.Linear(width * 4, width))]))
        self.ln_2 = tnn.LayerNorm(width)
        self.attn_mask = attn_mask          # a plain tensor attribute, as in OpenAI's code

    def forward(self, x):                   # (T, B, C)
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False, attn_mask=self.attn_mask)[0]
        return x + self.mlp(self.ln_2(x))


class QuickGELU(tnn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class Transformer(tnn.Module):
    def __init__(self, width, layers, heads, attn_mask):
        super().__init__()
        self.resblocks = tnn.Sequential(*[ResidualAttentionBlock(width, heads, attn_mask) for _ in range(layers)])

    def forward(self, x):
        return self.resblocks(x)


class TorchOpenAICLIPResNet(tnn.Module):
    """OpenAI CLIP (model.py) with a ModifiedResNet image tower; encode_image without positional embedding."""

    def __init__(self, embed_dim, image_resolution, vision_layers, vision_width, context_length, vocab_size,
                 transformer_width, transformer_heads, transformer_layers):
        super().__init__()
        self.visual = ModifiedResNet(vision_layers, embed_dim, vision_width * 32 // 64, image_resolution, vision_width)
        mask = torch.full((context_length, context_length), float("-inf")).triu_(1)
        self.transformer = Transformer(transformer_width, transformer_layers, transformer_heads, mask)
        self.token_embedding = tnn.Embedding(vocab_size, transformer_width)
        self.positional_embedding = tnn.Parameter(0.01 * torch.randn(context_length, transformer_width))
        self.ln_final = tnn.LayerNorm(transformer_width)
        self.text_projection = tnn.Parameter(transformer_width ** -0.5 * torch.randn(transformer_width, embed_dim))
        self.logit_scale = tnn.Parameter(torch.tensor(4.6052))

    def encode_image(self, image):
        return self.visual(image)

    def encode_text(self, text):
        x = self.token_embedding(text) + self.positional_embedding
        x = self.transformer(x.permute(1, 0, 2)).permute(1, 0, 2)
        x = self.ln_final(x)
        return x[torch.arange(x.shape[0]), text.argmax(dim=-1)] @ self.text_projection

    def forward(self, image, text):
        return self.encode_image(image), self.encode_text(text)
