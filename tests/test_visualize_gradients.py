"""tools/visualize_gradients.py (the paper's Fig. 5): its arrays are the gradient norms that
torch.autograd.grad gives on the same model and image; its pictures and its bounds."""
import os
import runpy
import types

import numpy as np
import pytest
import torch
from conftest import run_logged, save_random_model, tiny_opts
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model
from PIL import Image

import deformable_detr.modeling.slim_resnet  # noqa: F401  (registers the demo backbone)
from deformable_detr.data import DeformableDetrDatasetMapper, generate_shapes_dataset
from deformable_detr.engine import setup_cfg
from deformable_detr.visualization import ELEMENTS, gradient_maps

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The tool's functions, loaded from its file as ``python tools/visualize_gradients.py`` would.
visualize_gradients = types.SimpleNamespace(
    **runpy.run_path(os.path.join(ROOT, "tools", "visualize_gradients.py")))

CONFIG = os.path.join(ROOT, "configs", "demo", "deformable_detr_shapes.yaml")
# The demo config shrunk for speed (the tiny model of conftest.py).
TINY = tiny_opts("INPUT.MIN_SIZE_TEST", "96", "INPUT.MAX_SIZE_TEST", "160", demo=True)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(image path, weights path, opts) of a randomly initialised tiny demo model."""
    root = tmp_path_factory.mktemp("gradients")
    generate_shapes_dataset(str(root / "shapes"), num_train=1, num_val=1, seed=3)

    def init(model):
        # The box heads start at zero (boxes independent of the image): give them weights.
        for head in model.bbox_embed:
            head.layers[-1].weight.normal_(0, 0.1)

    weights = save_random_model(setup_cfg(CONFIG, TINY), root, init)
    return str(root / "shapes" / "val" / "000000.png"), weights, TINY + ["MODEL.WEIGHTS", weights]


def run_tool(args, caplog):
    return run_logged(visualize_gradients.main, args, caplog)


def reference(image_path, opts):
    """(logits [Q, C], boxes [Q, 4], maps(q)): the gradient norm of each element of query
    q's prediction, by autograd on the model and the mapper's test-time input (as
    evaluation builds it)."""
    cfg = setup_cfg(CONFIG, opts)
    model = build_model(cfg).eval()
    DetectionCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    h, w = Image.open(image_path).size[::-1]
    d = DeformableDetrDatasetMapper(cfg, is_train=False)(
        {"file_name": image_path, "height": h, "width": w, "image_id": 0})
    image = d["image"].float().requires_grad_(True)
    out = model.raw_outputs([{"image": image}])
    logits, boxes = out["pred_logits"][0], out["pred_boxes"][0]

    def maps(q):
        elements = {"cx": boxes[q, 0], "cy": boxes[q, 1], "w": boxes[q, 2], "h": boxes[q, 3],
                    "class": logits[q].max().sigmoid()}
        return {k: torch.autograd.grad(e, image, retain_graph=True)[0].norm(dim=0).numpy()
                for k, e in elements.items()}

    return logits.detach(), boxes.detach().numpy(), maps


def test_arrays_are_autograd_gradient_norms(setup, tmp_path, caplog):
    image, _, opts = setup
    out = tmp_path / "out"
    rc = run_tool(["--config-file", CONFIG, "--input", image, "--output", str(out),
                   "--topk", "2", *opts], caplog)
    assert rc == 0, caplog.text
    files = sorted(os.listdir(out))
    assert len(files) == 4 and all(f.startswith("000000_q") for f in files)
    logits, boxes, maps = reference(image, opts)
    top2 = logits.max(-1).values.argsort(descending=True)[:2].tolist()
    assert files == sorted(f"000000_q{q}.{ext}" for q in top2 for ext in ("npz", "png"))
    for q in top2:
        data = np.load(out / f"000000_q{q}.npz")
        expected = maps(q)
        assert int(data["query"]) == q and int(data["label"]) == int(logits[q].argmax())
        np.testing.assert_allclose(data["box"], boxes[q], rtol=1e-5)
        for k in ELEMENTS:
            # The model's input size: the short side resized to INPUT.MIN_SIZE_TEST.
            assert data[k].shape == expected[k].shape and min(data[k].shape) == 96, k
            assert data[k].max() > 0
            np.testing.assert_allclose(data[k], expected[k], rtol=1e-4,
                                       atol=1e-6 * expected[k].max(), err_msg=k)
        picture = np.asarray(Image.open(out / f"000000_q{q}.png"))
        assert picture.ndim == 3 and picture.shape[1] > 4 * picture.shape[0] / 2

    # --query: that query only.
    rc = run_tool(["--config-file", CONFIG, "--input", image, "--output", str(tmp_path / "q"),
                   "--query", "5", *opts], caplog)
    assert rc == 0 and sorted(os.listdir(tmp_path / "q")) == ["000000_q5.npz", "000000_q5.png"]


def test_library_leaves_the_model_as_it_was(setup):
    _, weights, opts = setup
    model = build_model(setup_cfg(CONFIG, opts)).eval()
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    image = torch.randint(0, 256, (3, 64, 80), dtype=torch.uint8)
    (det,) = gradient_maps(model, image, queries=[3])
    assert det.query == 3 and set(det.maps) == set(ELEMENTS)
    assert all(m.shape == (64, 80) for m in det.maps.values())
    assert {n for n, p in model.named_parameters() if not p.requires_grad} == frozen
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(ValueError, match=r"--query must be in \[0, 9\]"):
        gradient_maps(model, image, queries=[10])


@pytest.mark.parametrize("args, message", [
    (["--topk", "11"], "--topk: expected an integer in [1, 10]"),
    (["--query", "-1"], "--query: expected an integer >= 0"),
    (["--dpi", "1000"], "--dpi: expected an integer in [30, 300]"),
])
def test_tool_bounds_its_work(args, message, setup, tmp_path, capsys):
    image, _, opts = setup
    with pytest.raises(SystemExit):
        visualize_gradients.main(["--config-file", CONFIG, "--input", image, "--output",
                                  str(tmp_path), *args, *opts])
    assert message in capsys.readouterr().err


def test_tool_messages(setup, tmp_path, caplog, capsys):
    image, weights, opts = setup
    # A query the model does not have: reported for the image, exit status 1.
    rc = run_tool(["--config-file", CONFIG, "--input", image, "--output", str(tmp_path),
                   "--query", "10", *opts], caplog)
    assert rc == 1 and "--query must be in [0, 9]" in caplog.text
    # KEY VALUE pairs before the other options would be read as images.
    with pytest.raises(SystemExit):
        visualize_gradients.main(["--config-file", CONFIG, "--input", image, "MODEL.WEIGHTS",
                                  weights, "--output", str(tmp_path)])
    assert "MODEL.WEIGHTS is a config key, not an image" in capsys.readouterr().err
    # No weights: refused, as by the other tools.
    rc = run_tool(["--config-file", CONFIG, "--input", image, "--output", str(tmp_path),
                   *TINY], caplog)
    assert rc == 2 and "--allow-random-weights" in caplog.text
