"""Print README's reference table: each yardstick's parameters and multiply-adds at 224 px, 1000 classes.

    python docs/reference_table.py

Multiply-adds are ``FlopCounterMode`` FLOPs / 2 (convolutions and linear layers; SE pooling,
activations and BatchNorm are not counted, as in the papers). The published figures are the papers'
or, where noted, TensorFlow-slim's table and the peer library's parameter count.
"""

from __future__ import annotations

from nas.models import cost
from nas.space import REFERENCE_NAMES, reference

# name -> (published parameters, published multiply-adds, where they are published)
PUBLISHED = {
    "mobilenet_v1": ("4.2 M", "569 M", "V1 paper; timm `mobilenetv1_100` 4,231,976"),
    "mobilenet_v2": ("3.4 M", "300 M", "V2 paper; torchvision `mobilenet_v2` 3,504,872"),
    "mobilenet_v3_large": ("5.4 M", "219 M", "V3 paper; torchvision 5,483,032"),
    "mobilenet_v3_small": ("2.5 M", "56 M", "V3 paper; torchvision 2,542,856"),
    "mobilenet_v3_large_075": ("4.0 M", "155 M", "V3 paper; timm `mobilenetv3_large_075` 3,993,528"),
    "mobilenet_v3_small_075": ("2.0 M", "44 M", "V3 paper; timm `mobilenetv3_small_075` 2,041,872"),
    "mobilenet_v3_small_050": ("1.6 M", "—", "timm `mobilenetv3_small_050` 1,593,224"),
    "mobilenet_v3_large_minimal": ("3.9 M", "209 M", "TF-slim; timm `tf_mobilenetv3_large_minimal_100` 3,924,288"),
    "mobilenet_v3_small_minimal": ("2.0 M", "65 M", "TF-slim; timm `tf_mobilenetv3_small_minimal_100` 2,044,736"),
}  # fmt: skip


def main() -> None:
    print("| `reference:NAME` | params | multiply-adds | published params / multiply-adds (source) |")
    print("|---|---|---|---|")
    for name in REFERENCE_NAMES:
        c = cost(reference(name), num_classes=1000)
        params, madds, source = PUBLISHED[name]
        print(f"| `{name}` | {c.params:,} | {c.flops / 2e6:.1f} M | {params} / {madds} ({source}) |")


if __name__ == "__main__":
    main()
