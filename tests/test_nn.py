"""metakd.functional.nn: FunctionalModel and the closed-form BatchNorm double backward (batch_norm_train)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from metakd.functional.nn import FunctionalModel, batch_norm_train, double_backward_batchnorm

SHAPES = [(6, 3, 4, 5), (7, 4), (5, 3, 6)]


def _inputs(shape, affine):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=g, dtype=torch.float64).requires_grad_(True)
    c = shape[1]
    w = (
        (torch.rand(c, generator=g, dtype=torch.float64) + 0.5).requires_grad_(True)
        if affine
        else None
    )
    b = torch.randn(c, generator=g, dtype=torch.float64).requires_grad_(True) if affine else None
    return x, w, b


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("shape", SHAPES)
def test_batch_norm_train_gradcheck_and_gradgradcheck(shape, affine):
    x, w, b = _inputs(shape, affine)
    args = (x, w, b) if affine else (x,)

    def f(*a):
        return batch_norm_train(a[0], *(a[1:] if affine else (None, None)), eps=1e-5)

    assert torch.autograd.gradcheck(f, args)
    assert torch.autograd.gradgradcheck(f, args)


@pytest.mark.parametrize("shape", SHAPES)
def test_batch_norm_train_matches_stock_batchnorm_to_second_order(shape):
    """Value, gradient and the reverse-over-reverse product equal the stock F.batch_norm's."""
    x, w, b = _inputs(shape, True)
    g = torch.Generator().manual_seed(2)
    r = torch.randn(shape, generator=g, dtype=torch.float64).requires_grad_(True)
    v = [torch.randn(t.shape, generator=g, dtype=torch.float64) for t in (x, w, b)]

    def second_order(bn):
        y = bn(x, w, b)
        grads = torch.autograd.grad((y * r).sum() + (y**3).sum(), (x, w, b), create_graph=True)
        inner = sum((gr * vi).sum() for gr, vi in zip(grads, v))
        return y, grads, torch.autograd.grad(inner, (x, w, r))

    ours = second_order(lambda x, w, b: batch_norm_train(x, w, b, 1e-5))
    stock = second_order(lambda x, w, b: F.batch_norm(x, None, None, w, b, True, 0.1, 1e-5))
    torch.testing.assert_close(ours[0], stock[0], rtol=1e-12, atol=1e-12)
    for a, s in zip(ours[1] + ours[2], stock[1] + stock[2]):
        torch.testing.assert_close(a, s, rtol=1e-9, atol=1e-10)


def _bn_net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3),
        nn.BatchNorm1d(3),
    )  # fmt: skip


def _grad_fns(t):
    seen, stack, names = set(), [t.grad_fn], set()
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        names.add(type(fn).__name__)
        stack.extend(f for f, _ in fn.next_functions)
    return names


def test_functional_model_uses_fast_batchnorm_only_inside_the_context():
    net = _bn_net().train()
    fm = FunctionalModel(net)
    x = torch.randn(5, 3, 6, 6)
    params = {k: v.detach().requires_grad_(True) for k, v in net.named_parameters()}
    plain = fm(params, x)
    assert "NativeBatchNormBackward0" in _grad_fns(plain)
    with double_backward_batchnorm():
        fast = fm(params, x)
        net.eval()  # eval mode reads running statistics: stock kernels
        evaluated = fm(params, x)
        net.train()
    assert "_BatchNormTrainBackward" in _grad_fns(fast)
    assert "NativeBatchNormBackward0" not in _grad_fns(fast)
    assert "_BatchNormTrainBackward" not in _grad_fns(evaluated)
    torch.testing.assert_close(fast, plain)
    # no running-statistics update leaks out of either call
    assert int(net[1].num_batches_tracked) == 0
    with double_backward_batchnorm(enabled=False):
        assert "NativeBatchNormBackward0" in _grad_fns(fm(params, x))


def test_hypergradient_uses_fast_batchnorm_unless_the_caller_disables_it(monkeypatch):
    import metakd.functional.nn as mnn
    from metakd import hypergradient
    from metakd.functional import optim
    from metakd.functional.losses import cross_entropy

    net = _bn_net().double().train()
    fm = FunctionalModel(net)
    g = torch.Generator().manual_seed(3)
    batches = [(torch.randn(6, 3, 6, 6, generator=g, dtype=torch.float64), torch.arange(6) % 3)]
    batches *= 2
    meta = {"s": torch.tensor(0.7, dtype=torch.float64, requires_grad=True)}

    def train_loss(p, m, batch):
        x, y = batch
        return m["s"] * cross_entropy(fm(p, x), y) + (1 - m["s"]) * fm(p, x).pow(2).mean()

    def val_loss(p, batch):
        return cross_entropy(fm(p, batch[0]), batch[1])

    calls = []
    real = mnn.batch_norm_train
    monkeypatch.setattr(mnn, "batch_norm_train", lambda *a, **k: calls.append(1) or real(*a, **k))
    params = {k: v.detach() for k, v in net.named_parameters()}

    def run():
        return hypergradient(
            train_loss, val_loss, params, meta, batches, batches[0], optim.sgd(0.1)
        )

    fast = run()
    n_fast = len(calls)
    with double_backward_batchnorm(False):
        stock = run()
    assert n_fast > 0 and len(calls) == n_fast  # the explicit False wins over the engine's default
    torch.testing.assert_close(fast.grads["s"], stock.grads["s"], rtol=1e-9, atol=1e-12)


def test_torch_func_transforms_inside_the_context_keep_the_stock_batchnorm():
    """A loss that vmaps the model (e.g. per-example terms) still works inside the reverse engine."""
    from torch.func import vmap

    net = _bn_net().train()
    fm = FunctionalModel(net)
    params = {k: v.detach().requires_grad_(True) for k, v in net.named_parameters()}
    xs = torch.randn(2, 5, 3, 6, 6)
    with double_backward_batchnorm():
        out = vmap(lambda x: fm(params, x))(xs)
    ref = torch.stack([fm(params, x) for x in xs])
    torch.testing.assert_close(out, ref)


def test_batch_norm_train_updates_running_statistics_as_the_stock_call():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(7, 3, 4, 4, generator=g, dtype=torch.float64)
    w, b = torch.rand(3, dtype=torch.float64) + 0.5, torch.randn(3, dtype=torch.float64)
    stats = [torch.randn(3, dtype=torch.float64), torch.rand(3, dtype=torch.float64) + 0.5]
    ours_stats, ref_stats = [s.clone() for s in stats], [s.clone() for s in stats]
    ours = batch_norm_train(
        x, w, b, 1e-5, running_mean=ours_stats[0], running_var=ours_stats[1], momentum=0.3
    )
    ref = F.batch_norm(x, *ref_stats, w, b, training=True, momentum=0.3, eps=1e-5)
    assert torch.equal(ours, ref)
    assert all(torch.equal(a, r) for a, r in zip(ours_stats, ref_stats))


def _sequential_bn() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(64, 3)
    ).double()


def test_hypergradient_through_a_plain_functional_call_takes_the_fast_batchnorm(monkeypatch):
    """The way torchopt users write it: torch.func.functional_call of an nn.Sequential with its real
    buffers. The engine routes its BatchNorm to batch_norm_train: the same hypergradient and running
    statistics as the stock path, to float64 roundoff."""
    import metakd.functional.nn as mnn
    from metakd import hypergradient
    from metakd.functional import optim
    from metakd.functional.losses import cross_entropy

    g = torch.Generator().manual_seed(4)
    batches = [
        (torch.randn(6, 3, 4, 4, generator=g, dtype=torch.float64), torch.arange(6) % 3)
        for _ in range(3)
    ]
    meta = {"s": torch.tensor(0.6, dtype=torch.float64, requires_grad=True)}
    calls: list[int] = []
    real = mnn.batch_norm_train
    monkeypatch.setattr(mnn, "batch_norm_train", lambda *a, **k: calls.append(1) or real(*a, **k))

    def run(stock: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        net = _sequential_bn().train()

        def train_loss(p, m, batch):
            logits = functional_call(net, p, (batch[0],))
            return m["s"] * cross_entropy(logits, batch[1]) + (1 - m["s"]) * logits.pow(2).mean()

        def val_loss(p, batch):
            return cross_entropy(functional_call(net, p, (batch[0],)), batch[1])

        params = {k: v.detach() for k, v in net.named_parameters()}
        with double_backward_batchnorm(not stock):
            res = hypergradient(
                train_loss, val_loss, params, meta, batches, batches[0], optim.adam(0.05)
            )
        return res.grads["s"], [b.clone() for b in net.buffers()]

    fast, fast_buffers = run(stock=False)
    assert len(calls) == 4  # 3 unrolled train losses + the validation loss
    stock, stock_buffers = run(stock=True)
    assert len(calls) == 4
    torch.testing.assert_close(fast, stock, rtol=1e-9, atol=1e-12)
    for a, b in zip(fast_buffers, stock_buffers, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    assert int(fast_buffers[-1]) == 4  # num_batches_tracked: the user's module saw 4 train calls


def test_the_router_skips_its_mode_for_losses_without_batchnorm():
    from metakd.functional.nn import BatchNormRouter

    net = nn.Linear(3, 2)

    def loss(x: torch.Tensor) -> torch.Tensor:
        return net(x).sum()

    with double_backward_batchnorm():
        router = BatchNormRouter()
        routed = router.wrap(loss)
        routed(torch.randn(4, 3))
        assert router.keep is False
        again = BatchNormRouter()
        again.wrap(loss)
        assert again.keep is False  # remembered for the same function: no probe next time
    assert BatchNormRouter().wrap(loss) is loss  # outside the context nothing is routed
