import json

import numpy as np
import torch

import foresight_compile
from toy import ToyDiT, toy_loop


def test_reuse_map_png_renders_and_json_carries_the_same_data(tmp_path):
    torch.manual_seed(0)
    fast = torch.compile(ToyDiT(layers=4).eval(), backend="foresight",
                         options={"policy": "foresight", "warmup": 3, "threshold": 100.0,
                                  "lowering": "eager"})
    toy_loop(fast, 12)
    s = foresight_compile.stats(fast)
    path = s.plot(str(tmp_path / "map.png"))
    import matplotlib.image as mpimg
    image = mpimg.imread(path)
    assert image.shape[0] > 200 and image.shape[1] > 300
    assert np.std(image[..., :3]) > 0.05  # not blank
    data = json.loads(s.to_json())
    assert data["mask"] == s.mask and len(data["change"]) == 12 and len(data["thresholds"][-1]) == 4
    assert data["reused_fraction"] == s.reused_fraction > 0
    # thresholds are set at the last warmup step and recorded from then on
    assert data["thresholds"][1] == [-1.0] * 4 and min(data["thresholds"][2]) > 0
