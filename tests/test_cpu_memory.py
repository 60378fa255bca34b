"""The huge-page cache for large CPU tensors: blocks are reused, never shared by two live
tensors, bounded by the limit, safe across fork and with oneDNN, and it leaves results as
they are (references: float64 computations, values written before)."""
import threading

import pytest
import torch
import torch.nn.functional as F

from deformable_detr.layers import has_compiled_op
from deformable_detr.utils import cpu_memory as cm

pytestmark = pytest.mark.skipif(not has_compiled_op(), reason="extension not built")

MIB = 1 << 20


@pytest.fixture
def cache():
    """The cache on for one test; off and emptied after it (other tests keep PyTorch's)."""
    assert cm.enable_cpu_memory_cache(), "the cache should install on a plain PyTorch"
    yield
    cm.enable_cpu_memory_cache(cm.DEFAULT_MAX_CACHED_BYTES)  # the default limit again
    cm.disable_cpu_memory_cache()
    cm.empty_cpu_memory_cache()


def floats(mib: float) -> int:
    return int(mib * MIB) // 4


def test_freed_blocks_are_reused_and_live_ones_are_not_shared(cache):
    before = cm.cpu_memory_cache_stats()
    a = torch.full((floats(3),), 1.0)  # 3 MiB: a 4 MiB block
    a_ptr = a.data_ptr()
    assert a_ptr % (2 * MIB) == 0, "large tensors start on a huge-page boundary"
    del a
    b = torch.full((floats(3.5),), 2.0)  # the same size class: the same block
    assert b.data_ptr() == a_ptr
    c = torch.full((floats(3.5),), 3.0)  # b is alive: a new block
    assert c.data_ptr() != b.data_ptr()
    assert bool((b == 2.0).all()) and bool((c == 3.0).all())
    stats = cm.cpu_memory_cache_stats()
    assert stats["hits"] - before["hits"] >= 1
    assert stats["misses"] - before["misses"] >= 1
    small = torch.ones(1000)  # below 2 MiB: PyTorch's allocator, as before
    assert float(small.sum()) == 1000.0


def test_the_limit_bounds_what_is_kept(cache):
    cm.empty_cpu_memory_cache()
    assert cm.enable_cpu_memory_cache(max_cached_bytes=4 * MIB)
    tensors = [torch.zeros(floats(4)) for _ in range(3)]
    del tensors
    stats = cm.cpu_memory_cache_stats()
    assert stats["cached_bytes"] == 4 * MIB, stats
    cm.empty_cpu_memory_cache()
    assert cm.cpu_memory_cache_stats()["cached_bytes"] == 0


def test_out_of_memory_is_pytorchs_error_and_empties_the_cache(cache):
    kept = torch.zeros(floats(4))
    del kept
    assert cm.cpu_memory_cache_stats()["cached_bytes"] > 0
    with pytest.raises(torch.OutOfMemoryError, match="not enough memory"):
        torch.empty(1 << 52, dtype=torch.uint8)  # 4 PiB
    assert cm.cpu_memory_cache_stats()["cached_bytes"] == 0


def test_onednn_convolution_and_matrix_products_are_unchanged(cache):
    """oneDNN takes its buffers through raw_allocate/raw_deallocate of the CPU allocator."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 32, 96, 96, generator=g).contiguous(memory_format=torch.channels_last)
    w = torch.randn(64, 32, 3, 3, generator=g) * 0.1
    lin = torch.randn(256, 64, generator=g) * 0.1
    for _ in range(3):  # again on reused blocks
        y = F.relu(F.conv2d(x, w, padding=1))
        z = y.flatten(2).transpose(1, 2) @ lin.t()
        ref = F.relu(F.conv2d(x.double(), w.double(), padding=1))
        ref = ref.flatten(2).transpose(1, 2) @ lin.double().t()
        torch.testing.assert_close(z.double(), ref, rtol=1e-4, atol=1e-4)


def test_training_step_of_the_model_is_unchanged(cache, tiny_cfg, make_inputs):
    from detectron2.modeling import build_model

    def losses(enabled):
        (cm.enable_cpu_memory_cache if enabled else cm.disable_cpu_memory_cache)()
        torch.manual_seed(0)
        model = build_model(tiny_cfg()).train()
        out = model(make_inputs(sizes=((384, 512), (512, 448))))
        total = sum(out.values())
        total.backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        return total.detach(), grads

    hits = cm.cpu_memory_cache_stats()["hits"]
    loss_cached, grads_cached = losses(True)
    assert cm.cpu_memory_cache_stats()["hits"] > hits, "the model's large tensors used it"
    loss_plain, grads_plain = losses(False)
    torch.testing.assert_close(loss_cached, loss_plain, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads_cached, grads_plain, rtol=1e-4, atol=1e-6)


def test_threads_allocating_at_once_never_share_a_block(cache):
    errors = []

    def work(k):
        for i in range(40):
            value = float(k * 1000 + i)
            t = torch.full((floats(2 + (i + k) % 5),), value)  # 2-6 MiB: several classes
            u = t * 2  # a product from the same pool while t is alive
            if not (bool((t == value).all()) and bool((u == 2 * value).all())):
                errors.append((k, i))

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


class _LargeTensors(torch.utils.data.Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, i):
        return torch.full((floats(3),), float(i))


def test_dataloader_workers_fork_with_the_cache_on(cache):
    # Blocks cached and in use at fork time; the workers allocate large tensors themselves.
    keep = torch.ones(floats(5))
    del keep
    live = torch.full((floats(3),), 7.0)
    loader = torch.utils.data.DataLoader(_LargeTensors(), batch_size=None, num_workers=2,
                                         multiprocessing_context="fork")
    values = sorted(float(t[0]) for t in loader)
    assert values == [0.0, 1.0, 2.0, 3.0]
    assert bool((live == 7.0).all())


def test_off_switches(monkeypatch, cache):
    cm.disable_cpu_memory_cache()
    assert not cm.cpu_memory_cache_enabled()
    before = cm.cpu_memory_cache_stats()
    t = torch.zeros(floats(6))
    assert cm.cpu_memory_cache_stats()["misses"] == before["misses"]
    del t
    monkeypatch.setenv(cm.ENV_VAR, "0")
    assert not cm.enable_cpu_memory_cache()
    assert not cm.cpu_memory_cache_enabled()
    with pytest.raises(ValueError, match="max_cached_bytes"):
        cm.enable_cpu_memory_cache(-1)
