"""lpips sub-score: SqueezeNet-1.1 LPIPS against a PyTorch reference, and the weight-file loaders."""
import numpy as np
import pytest

from helpers import max_abs_diff

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def lpips_pair(tmp_path_factory):
    from metrics_torch_refs import TorchLPIPSSqueeze, TorchSqueezeNet11
    from jdiffusion_lora.metrics.nets.lpips import LPIPSSqueeze, find_lpips_weights

    torch.manual_seed(0)
    ref = TorchLPIPSSqueeze(TorchSqueezeNet11()).eval()
    with torch.no_grad():   # LPIPS heads are non-negative
        for i in range(7):
            getattr(ref, f"lin{i}").model[1].weight.uniform_(0, 0.1)
    folder = tmp_path_factory.mktemp("weights")
    torch.save(ref.backbone.state_dict(), folder / "squeezenet1_1-b8a52dc0.pth")
    (folder / "lpips" / "weights" / "v0.1").mkdir(parents=True)
    torch.save(ref.heads_state_dict(), folder / "lpips" / "weights" / "v0.1" / "squeeze.pth")
    paths = find_lpips_weights(str(folder))
    assert paths is not None and len(paths) == 2
    return ref, LPIPSSqueeze.from_files(*paths)


@pytest.mark.slow   # compiles kernels no default test needs (cold-cache time; CI runs the slow set)
def test_lpips_matches_torch(lpips_pair, rng):
    from jdiffusion_lora._runtime import jt
    ref, ours = lpips_pair
    a = rng.uniform(-1, 1, (2, 3, 64, 64)).astype(np.float32)
    b = np.clip(a + rng.normal(0, 0.3, a.shape), -1, 1).astype(np.float32)
    with torch.no_grad():
        expected = ref(torch.tensor(a), torch.tensor(b)).numpy()
    got = ours(jt.array(a), jt.array(b)).numpy()
    assert got.shape == (2,)
    assert max_abs_diff(got, expected) <= 1e-5
    assert abs(float(ours(jt.array(a), jt.array(a)).numpy()[0])) < 1e-6


def test_lpips_full_module_state_dict_loads(lpips_pair, tmp_path):
    from jdiffusion_lora.metrics.nets.lpips import LPIPSSqueeze
    ref, ours = lpips_pair
    # the names lpips.LPIPS itself uses: net.sliceN.<features index>..., lin0.model.1.weight, lins.0...
    state = {f"net.slice1.{k}": v for k, v in ref.backbone.features.state_dict().items()}
    state.update({f"lins.{i}.model.1.weight": getattr(ref, f"lin{i}").model[1].weight for i in range(7)})
    state.update(ref.heads_state_dict())
    torch.save(state, tmp_path / "lpips_squeeze.pth")
    again = LPIPSSqueeze.from_files(str(tmp_path / "lpips_squeeze.pth"))
    for k, v in ours.state_dict().items():
        assert np.array_equal(v.numpy(), again.state_dict()[k].numpy()), k
